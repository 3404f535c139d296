"""Hostile or unusual data at the edges of the readers: wide pixels, decompression bombs, FIFOs,
deeply nested files, YAML tags, names that leave their folder, errors in DataLoader workers. Each
is a one-line DataError naming the file (or is read right), never a hang or a traceback."""

import json
import os
import re
import threading

import numpy as np
import pytest
from PIL import Image

from tasks.base import DataError, load_image, read_json, read_jsonl, readable
from tasks.router import TaskRouter, load_yaml
from tasks.synthetic import generate


def within(seconds, call):
    """``call()``'s outcome (its value or the exception it raised), or a test failure when it is
    still running after ``seconds`` (a FIFO opened for reading blocks until a writer comes)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as err:  # handed to the test
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    return outcome


def test_16_bit_grey_images_load_as_their_8_bit_values(tmp_path):
    """A 16-bit PNG or TIFF was all white (PIL's convert clips at 255); its pixels are scaled by
    the bit depth: v → round(v / 257), so k·257 gives k exactly."""
    wide = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    wide[0, :4] = [0, 257, 128 * 257, 65535]  # exact 8-bit equivalents 0, 1, 128, 255
    expected = np.rint(wide / 257).astype(np.uint8)
    for name in ("grey16.png", "grey16.tif"):
        Image.fromarray(wide).save(tmp_path / name)
        with Image.open(tmp_path / name) as raw:
            assert raw.mode.startswith("I;16"), raw.mode  # what PIL gives for such files
        pixels = np.asarray(load_image(tmp_path / name, "test"))
        assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
        for channel in range(3):
            np.testing.assert_array_equal(pixels[..., channel], expected, err_msg=name)
        assert list(pixels[0, :4, 0]) == [0, 1, 128, 255]
    # 32-bit integers: their value range is unknown, so not guessed (and reported by tasks.check)
    Image.fromarray(wide.astype(np.int32)).save(tmp_path / "int32.tif")
    with pytest.raises(DataError, match=r"int32.tif has 'I' pixels .* convert it to 8 or 16 bits"):
        load_image(tmp_path / "int32.tif", "ann.json: record 3")
    assert not readable(tmp_path / "int32.tif")


def test_decompression_bombs_are_refused_naming_the_image(tmp_path, monkeypatch):
    """PIL raises past 2× MAX_IMAGE_PIXELS (an error of its own type, not OSError: it escaped
    load_image) and only warns past 1× (the image was decoded): both are a DataError."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)
    for side in (5, 8):  # 25 pixels: PIL's warning; 64 > 2 × 20: its error
        Image.new("RGB", (side, side)).save(tmp_path / f"bomb{side}.png")
        with pytest.raises(DataError, match=rf"record 1: field 'image': .*bomb{side}.png is "
                           r"refused as a decompression bomb \(Image size"):  # fmt: skip
            load_image(tmp_path / f"bomb{side}.png", "ann.json: record 1")


def test_a_fifo_is_never_opened_as_an_image_or_an_annotation_file(tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: load_image hung; the readers named
    it 'not found'. Each is refused, naming it as not a regular file."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    outcome = within(5, lambda: load_image(fifo, "ann.json: record 7"))
    assert isinstance(outcome.get("error"), DataError)
    assert str(outcome["error"]) == (
        f"ann.json: record 7: field 'image': {fifo} is not a regular file (a FIFO): not read"
    )
    for read in (read_json, read_jsonl, load_yaml):
        error = within(5, lambda read=read: read(fifo)).get("error")
        assert isinstance(error, DataError), read
        assert str(error) == f"{fifo}: file is not a regular file (a FIFO): not read"
    generate(tmp_path / "data", images=12, seed=0, size=32)
    router = TaskRouter.from_yaml(tmp_path / "data" / "tasks.yaml", only=["caption"])
    victim = router["caption"].read("test")[0]["images"][0]
    victim.unlink()
    os.mkfifo(victim)
    with pytest.raises(DataError, match=rf"field 'image': {victim} is not a regular file \(a FIFO"):
        router["caption"].read("test")


def test_deeply_nested_json_is_a_data_error_naming_the_file(tmp_path):
    """json.load's RecursionError escaped the readers as a bare traceback."""
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.json").write_text(deep)
    with pytest.raises(DataError, match=r"deep.json: JSON nested too deeply to read"):
        read_json(tmp_path / "deep.json")
    (tmp_path / "deep.jsonl").write_text('{"a": 1}\n' + deep + "\n")
    with pytest.raises(DataError, match=r"deep.jsonl: line 2: JSON nested too deeply"):
        read_jsonl(tmp_path / "deep.jsonl")
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 20_000 + "]" * 20_000 + "\n")
    with pytest.raises(DataError, match=r"deep.yaml: YAML nested too deeply to read"):
        load_yaml(tmp_path / "deep.yaml")


def test_json_lines_end_at_newlines_only(tmp_path):
    """A U+2028 inside a JSON string is text (JSON allows it unescaped); splitlines() cut the
    record there and called the line malformed."""
    rows = [{"sentence": "left\u2028right", "n": 1}, {"sentence": "x\x85y", "n": 2}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows))
    assert read_jsonl(path) == rows


@pytest.mark.parametrize(
    "text",
    ['vqa: !!python/object/apply:os.system ["echo hi"]\n', "vqa: !custom {reader: vqa}\n"],
)
def test_a_yaml_tag_in_a_task_router_file_is_one_line_naming_the_file(tmp_path, text):
    (tmp_path / "tasks.yaml").write_text(text)
    with pytest.raises(DataError) as caught:
        TaskRouter.from_yaml(tmp_path / "tasks.yaml")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'tasks.yaml'}: ")
    assert "line 1 column 6" in message and "no tags" in message


@pytest.mark.parametrize("name", ["../../x", "a/b", "/abs", ".hidden", "..", "", "x\ny", 3])
def test_task_names_that_could_leave_their_folder_are_refused(tmp_path, name):
    """A task's name becomes file names under the run's eval/ folder: '../../x' wrote outside."""
    entry = {"reader": "gqa", "root": "."}
    expected = re.escape(f"tasks.yaml: key {name!r}: task name {name!r} is not a plain name")
    with pytest.raises(DataError, match=expected):
        TaskRouter.from_dict({name: entry}, tmp_path, where="tasks.yaml")
    assert TaskRouter.from_dict({"gqa-2.v1_x": entry}, tmp_path).tasks  # plain names pass


def test_an_unreadable_image_in_a_loader_worker_is_one_line(tmp_path):
    """torch re-raises a worker's error with the worker's traceback as the message (22 lines);
    the loaders give the worker's one-line DataError naming the record and the image."""
    from tasks.loader import multitask_loader
    from tasks.sampler import MultitaskSampler
    from vlpeft.models import build_model

    generate(tmp_path, images=12, seed=0, size=32)
    router = TaskRouter.from_yaml(tmp_path / "tasks.yaml", only=["caption"])
    dataset = router.dataset("caption", "train", build_model("clip-bart", "tiny", image_size=32))
    for record in dataset.records:
        record["images"][0].write_bytes(b"not an image")
    sampler = MultitaskSampler({"caption": len(dataset)}, {"caption": 2})
    loader = multitask_loader({"caption": dataset}, sampler, num_workers=1)
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    message = str(caught.value)
    assert "\n" not in message, message
    record = next(r for r in dataset.records if f"record {r['id']!r}" in message)
    assert message == (
        f"{record['source']}: record {record['id']!r}: field 'image': {record['images'][0]} is "
        "unreadable (UnidentifiedImageError: cannot identify image file "
        f"'{record['images'][0]}')"
    )
