"""Readers on hand-written files in each official format, the synthetic set, router, sampler, bad input."""

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from tasks.base import DataError, TaskConfig, get_task, list_tasks, load_task_modules
from tasks.router import TaskRouter, take
from tasks.sampler import MultitaskSampler, SamplerConfig
from tasks.synthetic import Writer, generate
from tasks.vqa import answer_scores, most_frequent_answers, soft_score
from vlpeft.models import build_model


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


@pytest.fixture()
def vqa_dir(tmp_path):
    answers = (
        ["2"] * 3 + ["two"] * 4 + ["3", "2", "Two "]
    )  # "2" by 4, "two" by 5 (case/space), "3" by 1
    write(
        tmp_path / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json",
        {
            "questions": [
                {"image_id": 42, "question": "How many dogs?", "question_id": 420},
                {"image_id": 7, "question": "Is it red?", "question_id": 70},
            ]
        },
    )
    write(
        tmp_path / "vqa" / "v2_mscoco_val2014_annotations.json",
        {
            "annotations": [
                {
                    "question_id": 420,
                    "image_id": 42,
                    "question_type": "how many",
                    "answer_type": "number",
                    "multiple_choice_answer": "two",
                    "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)],
                },
                {
                    "question_id": 70,
                    "image_id": 7,
                    "question_type": "is it",
                    "answer_type": "yes/no",
                    "multiple_choice_answer": "yes",
                    "answers": [{"answer": "yes", "answer_id": i + 1} for i in range(10)],
                },
            ]
        },
    )
    write(
        tmp_path / "vqa" / "v2_OpenEnded_mscoco_train2014_questions.json",
        {"questions": [{"image_id": 1, "question": "What?", "question_id": 10}]},
    )
    write(
        tmp_path / "vqa" / "v2_mscoco_train2014_annotations.json",
        {
            "annotations": [
                {
                    "question_id": 10,
                    "image_id": 1,
                    "question_type": "what",
                    "answer_type": "other",
                    "multiple_choice_answer": "cat",
                    "answers": [{"answer": "cat", "answer_id": i + 1} for i in range(10)],
                }
            ]
        },
    )
    write(
        tmp_path / "dataset_coco.json",
        {
            "images": [
                {
                    "filepath": "val2014",
                    "filename": "COCO_val2014_000000000042.jpg",
                    "cocoid": 42,
                    "imgid": 0,
                    "split": "test",
                    "sentences": [{"raw": "Two dogs. "}],
                },
                {
                    "filepath": "val2014",
                    "filename": "COCO_val2014_000000000007.jpg",
                    "cocoid": 7,
                    "imgid": 1,
                    "split": "restval",
                    "sentences": [{"raw": "A red ball"}, {"raw": "a ball"}],
                },
                {
                    "filepath": "train2014",
                    "filename": "COCO_train2014_000000000001.jpg",
                    "cocoid": 1,
                    "imgid": 2,
                    "split": "train",
                    "sentences": [{"raw": "a cat"}],
                },
            ]
        },
    )
    for name in (
        "val2014/COCO_val2014_000000000042.jpg",
        "val2014/COCO_val2014_000000000007.jpg",
        "train2014/COCO_train2014_000000000001.jpg",
    ):
        image(tmp_path / "images" / name)
    return tmp_path


def vqa_task(root, **kw):
    config = {
        "reader": "vqa",
        "root": "vqa",
        "images": "images",
        "options": {"karpathy": "dataset_coco.json"},
        **kw,
    }
    return TaskRouter.from_dict({"vqa": config}, root)["vqa"]


def test_the_registry_holds_every_task_file_of_the_package():
    """Task modules are found by scanning the package (no list to edit); modules that define no
    task are not among them."""
    modules = load_task_modules()
    assert modules == tuple(sorted({get_task(name).__module__ for name in list_tasks()}))
    assert not {"tasks.router", "tasks.synthetic", "tasks.check", "tasks.base"} & set(modules)


@pytest.mark.parametrize("name", list_tasks())
def test_path_options_are_resolved_against_the_yaml_folder(name, tmp_path):
    """Every option a task declares as a path is resolved like ``root``; other options are not."""
    task = get_task(name)
    options = {key: "some/file.json" for key in task.path_options} | {"other": "as/is"}
    router = TaskRouter.from_dict(
        {name: {"reader": name, "root": ".", "options": options}}, tmp_path
    )
    resolved = router[name].config.options
    assert resolved == {key: str(tmp_path / "some/file.json") for key in task.path_options} | {
        "other": "as/is"
    }


def test_soft_score_is_the_leave_one_out_average():
    assert [soft_score(k) for k in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    # brute force: mean over the 10 subsets of 9 of min(1, matches / 3)
    for k in range(11):
        given = [1] * k + [0] * (10 - k)
        brute = sum(min(1, sum(given[:i] + given[i + 1 :]) / 3) for i in range(10)) / 10
        assert soft_score(k) == pytest.approx(brute, abs=1e-4)


def test_vqa_official_files(vqa_dir):
    records = vqa_task(vqa_dir, splits={"val": "val2014"}).read("val")
    assert [r["question_id"] for r in records] == [420, 70]
    first = records[0]
    assert (
        first["answer_type"] == "number"
        and first["target"] == "two"
        and len(first["answers"]) == 10
    )
    assert first["label"] == {"2": 1.0, "two": 1.0, "3": 0.3}
    assert answer_scores(["a"] * 2 + ["b"] * 8) == {"a": 0.6, "b": 1.0}
    assert first["images"][0].name == "COCO_val2014_000000000042.jpg"
    task_answers = [r["target"] for r in records + records[:1]]
    assert most_frequent_answers(task_answers, size=1) == ["two"]


def test_vqa_karpathy_split_mapping(vqa_dir):
    task = vqa_task(vqa_dir, splits={"train": "karpathy_train", "test": "karpathy_test"})
    assert sorted(r["question_id"] for r in task.read("train")) == [10, 70]  # train + restval
    assert [r["question_id"] for r in task.read("test")] == [420]


def test_karpathy_captions_and_retrieval(vqa_dir):
    router = TaskRouter.from_dict(
        {
            "caption": {"reader": "caption", "root": ".", "images": "images"},
            "retrieval": {"reader": "retrieval", "root": ".", "images": "images"},
        },
        vqa_dir,
    )
    train = router["caption"].read("train")
    assert sorted(r["caption"] for r in train) == ["A red ball", "a ball", "a cat"]
    test = router["retrieval"].read("test")
    assert [(r["image_id"], r["captions"]) for r in test] == [(42, ["Two dogs."])]
    model = build_model("blip", "tiny")
    batch = take(router.dataset("retrieval", "train", model), [0, 1, 2])
    assert batch["kind"] == "retrieval" and batch["images"].shape == (3, 3, 32, 32)
    assert sorted(batch["image_ids"]) == [1, 7, 7]


def test_gqa_and_nlvr2_files(tmp_path):
    write(
        tmp_path / "gqa" / "testdev_balanced_questions.json",
        {
            "201": {
                "imageId": "n1",
                "question": "What is it?",
                "answer": "cat",
                "fullAnswer": "It is a cat.",
                "isBalanced": True,
                "types": {"structural": "query"},
            }
        },
    )
    image(tmp_path / "gqa" / "images" / "n1.jpg")
    write(
        tmp_path / "nlvr" / "dev.json",
        "\n".join(
            json.dumps(r)
            for r in [
                {"identifier": "dev-850-0-0", "sentence": "One dog.", "label": "True"},
                {"identifier": "dev-850-0-1", "sentence": "Two dogs.", "label": "False"},
            ]
        )
        + "\n",
    )
    image(tmp_path / "nlvr" / "img" / "dev" / "dev-850-0-img0.png")
    image(tmp_path / "nlvr" / "img" / "dev" / "dev-850-0-img1.png")
    router = TaskRouter.from_dict(
        {
            "gqa": {
                "reader": "gqa",
                "root": "gqa",
                "images": "gqa/images",
                "splits": {"test": "testdev"},
            },
            "nlvr2": {
                "reader": "nlvr2",
                "root": "nlvr",
                "images": "nlvr/img",
                "splits": {"val": "dev"},
            },
        },
        tmp_path,
    )
    (gqa,) = router["gqa"].read("test")
    assert (gqa["id"], gqa["target"], gqa["full_answer"]) == ("201", "cat", "It is a cat.")
    left, right = router["nlvr2"].read("val")
    assert [p.name for p in left["images"]] == ["dev-850-0-img0.png", "dev-850-0-img1.png"]
    assert left["images"] == right["images"] and (left["label"], right["label"]) == (1, 0)
    batch = take(router.dataset("nlvr2", "val", build_model("clip-bart", "tiny")), [0, 1])
    assert batch["images"].shape == (2, 2, 3, 64, 64)
    assert batch["targets"] == ["true", "false"] and batch["text"][0] == "nlvr: One dog."


# The tests above that read each task's official files, written by hand: a registered task without
# a row fails, naming it (the synthetic set alone would not catch a reader that misreads a format).
OFFICIAL_FILE_TESTS = {
    "vqa": [test_vqa_official_files, test_vqa_karpathy_split_mapping],
    "gqa": [test_gqa_and_nlvr2_files],
    "nlvr2": [test_gqa_and_nlvr2_files],
    "caption": [test_karpathy_captions_and_retrieval],
    "retrieval": [test_karpathy_captions_and_retrieval],
}


@pytest.mark.parametrize("name", list_tasks())
def test_every_task_reads_hand_written_official_files(name):
    if name not in OFFICIAL_FILE_TESTS:
        pytest.fail(
            f"task {name!r} has no test on hand-written official files (OFFICIAL_FILE_TESTS)"
        )
    assert all(
        callable(test) and test.__name__.startswith("test_") for test in OFFICIAL_FILE_TESTS[name]
    )


def test_synthetic_set_reads_through_the_official_readers(tmp_path):
    counts = generate(tmp_path, images=60, seed=3)
    again = generate(tmp_path / "again", images=60, seed=3)
    assert counts == again
    assert (tmp_path / "vqa" / "v2_mscoco_train2014_annotations.json").read_text() == (
        tmp_path / "again" / "vqa" / "v2_mscoco_train2014_annotations.json"
    ).read_text()
    router = TaskRouter.from_yaml(tmp_path / "tasks.yaml")
    assert sorted(router.tasks) == list_tasks()
    for name in router.tasks:
        for split in ("train", "val", "test"):
            assert router[name].read(split)
    vqa = router["vqa"].read("train")
    assert {r["answer_type"] for r in vqa} == {"yes/no", "number", "other"}
    assert all(len(r["answers"]) == 10 for r in vqa)
    captions = router["caption"].read("test")
    assert all(len(r["captions"]) == 5 and len(set(r["captions"])) == 5 for r in captions)
    labels = Counter(r["label"] for r in router["nlvr2"].read("train"))
    assert labels[0] == labels[1]


# What the training records of each task's synthetic split carry, by hand: a registered task
# without a row fails, naming it (a new task brings its writer and its row).
SYNTHETIC_RECORDS = {
    "vqa": {"question", "answers", "answer_type", "question_type", "target", "label"},
    "gqa": {"question", "target", "full_answer"},
    "nlvr2": {"sentence", "target", "label"},
    "caption": {"caption", "captions", "image_id"},
    "retrieval": {"caption", "captions", "image_id"},
}


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, images=40, seed=3, size=32)
    return root


@pytest.mark.parametrize("name", list_tasks())
def test_every_task_writes_and_reads_its_synthetic_splits(name, synthetic_set):
    """Each registered task has a synthetic writer (its own place in the one random stream) whose
    tasks.yaml entry reads every split through the task's reader."""
    if name not in SYNTHETIC_RECORDS:
        pytest.fail(f"task {name!r} has no row in SYNTHETIC_RECORDS (tests/test_tasks.py)")
    writer = get_task(name).synthetic_writer
    assert writer is not None and issubclass(writer, Writer), f"task {name!r} has no writer"
    others = [
        getattr(get_task(t).synthetic_writer, "order", None) for t in list_tasks() if t != name
    ]
    assert writer.order not in others, f"task {name!r} shares its writer's order"
    router = TaskRouter.from_yaml(synthetic_set / "tasks.yaml", only=[name])
    assert router[name].config.reader == name
    for split in ("train", "val", "test"):
        assert router[name].read(split)
    for record in router[name].read("train"):
        assert SYNTHETIC_RECORDS[name] <= set(record), (name, sorted(record))


def test_the_synthetic_set_stays_the_same_from_version_to_version(tmp_path):
    """The text files (and every file's name) of a seed's set, pinned: the demo's leaderboard and
    the exact-resume tests rest on them. Writers draw from one stream in a fixed order, so moving
    or reordering a draw changes this. (Image bytes are left out: they follow the JPEG library.)"""
    generate(tmp_path, images=40, seed=0, size=32)
    digest = hashlib.sha256()
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(tmp_path)).encode())
            if path.suffix in (".json", ".yaml"):
                digest.update(path.read_bytes())
    assert digest.hexdigest() == "ca45cbce1de0b87cc448d396f0179714d343412ab63a7506156a5c7adf808101"


def test_synthetic_answers_follow_the_image(tmp_path):
    """The colour answer is the colour of the pixels of the shape's column."""
    from tasks.synthetic import COLOURS, COLUMNS

    generate(tmp_path, images=40, seed=1, size=96)
    router = TaskRouter.from_yaml(tmp_path / "tasks.yaml")
    records = [r for r in router["vqa"].read("train") if r["question"].startswith("what color")]
    where = {
        r["image_id"]: r["target"]
        for r in router["vqa"].read("train")
        if r["question"].startswith("where")
    }
    checked = 0
    for r in records:
        picture = Image.open(r["images"][0]).convert("RGB")
        column = COLUMNS.index(where[r["image_id"]])
        pixel = picture.getpixel((int(96 / 3 * column + 48 / 3), 48))
        assert max(abs(a - b) for a, b in zip(pixel, COLOURS[r["target"]])) < 40, r
        checked += 1
    assert checked > 10


def test_sampler_proportional_and_deterministic():
    sizes, batch = {"a": 100, "b": 30, "c": 10}, {"a": 10, "b": 10, "c": 5}
    sampler = MultitaskSampler(sizes, batch, SamplerConfig(seed=1))
    steps = list(sampler.epoch(0))
    assert Counter(t for t, _ in steps) == {"a": 10, "b": 3, "c": 2}
    seen = Counter(i for t, idx in steps if t == "a" for i in idx)
    assert sorted(seen) == list(range(100)) and set(seen.values()) == {1}  # each record once
    assert steps == list(MultitaskSampler(sizes, batch, SamplerConfig(seed=1)).epoch(0))
    assert steps != list(sampler.epoch(1))


def test_sampler_balanced_and_temperature():
    sizes, batch = {"a": 400, "b": 20}, {"a": 10, "b": 10}
    balanced = Counter(MultitaskSampler(sizes, batch, SamplerConfig("balanced")).schedule(0))
    assert balanced["a"] == balanced["b"] == 21
    hot = Counter(
        MultitaskSampler(sizes, batch, SamplerConfig("temperature", temperature=100.0)).schedule(0)
    )
    cold = Counter(
        MultitaskSampler(sizes, batch, SamplerConfig("temperature", temperature=1.0)).schedule(0)
    )
    assert sum(hot.values()) == sum(cold.values()) == 42
    assert hot["b"] > cold["b"]  # a higher temperature flattens towards uniform
    with pytest.raises(ValueError, match="mode"):
        SamplerConfig("roundrobin")


def test_sampler_shards_are_disjoint_and_cover():
    sizes, batch = {"a": 11}, {"a": 2}
    shards = [MultitaskSampler(sizes, batch, rank=r, world_size=3) for r in range(3)]
    schedules = [s.schedule(0) for s in shards]
    assert schedules[0] == schedules[1] == schedules[2]
    seen = [i for s in shards for _, idx in s.epoch(0) for i in idx]
    assert set(seen) == set(range(11)) and len(seen) == 12  # padded by one, like DistributedSampler


# -- bad input -------------------------------------------------------------------------------------
def test_missing_file_and_malformed_json(vqa_dir):
    with pytest.raises(
        DataError, match="v2_OpenEnded_mscoco_test2015_questions.json: file not found"
    ):
        vqa_task(vqa_dir, splits={"test": "test2015"}).read("test")
    write(vqa_dir / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json", '{"questions": [')
    with pytest.raises(DataError, match="malformed JSON at line 1"):
        vqa_task(vqa_dir, splits={"val": "val2014"}).read("val")


def test_record_missing_a_field(vqa_dir):
    write(
        vqa_dir / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json",
        {"questions": [{"image_id": 42, "question_id": 420}]},
    )
    with pytest.raises(DataError, match=r"questions\[0\]: missing field 'question'"):
        vqa_task(vqa_dir, splits={"val": "val2014"}).read("val")


def test_nlvr_bad_label_names_the_line(tmp_path):
    write(
        tmp_path / "dev.json",
        json.dumps({"identifier": "dev-1-0-0", "sentence": "x", "label": "yes"}) + "\n",
    )
    task = TaskRouter.from_dict(
        {"n": {"reader": "nlvr2", "root": ".", "splits": {"val": "dev"}}}, tmp_path
    )["n"]
    with pytest.raises(DataError, match="dev.json: line 1: field 'label'"):
        task.read("val")


def test_unknown_task_and_key(tmp_path):
    with pytest.raises(DataError, match="did you mean 'nlvr2'"):
        TaskRouter.from_dict({"n": {"reader": "nlvr", "root": "."}}, tmp_path)
    with pytest.raises(DataError, match="did you mean 'batch_size'"):
        TaskRouter.from_dict({"n": {"reader": "gqa", "root": ".", "batchsize": 4}}, tmp_path)
    router = TaskRouter.from_dict({"n": {"reader": "gqa", "root": "."}}, tmp_path)
    with pytest.raises(DataError, match="unknown task 'm'"):
        router["m"]


def test_empty_split(tmp_path):
    write(tmp_path / "val_balanced_questions.json", {})
    task = TaskRouter.from_dict({"g": {"reader": "gqa", "root": "."}}, tmp_path)["g"]
    with pytest.raises(DataError, match="split 'val' .* is empty"):
        task.read("val")


def test_missing_and_unreadable_images(vqa_dir, caplog):
    (vqa_dir / "images" / "val2014" / "COCO_val2014_000000000042.jpg").unlink()
    with pytest.raises(DataError, match="record 420: field 'image': .*000000000042.jpg not found"):
        vqa_task(vqa_dir, splits={"val": "val2014"}).read("val")
    write(vqa_dir / "images" / "val2014" / "COCO_val2014_000000000042.jpg", "not an image")
    task = vqa_task(vqa_dir, splits={"val": "val2014"})
    dataset_records = task.read("val")
    from tasks.base import TaskDataset

    with pytest.raises(DataError, match="record 420: field 'image': .* is unreadable"):
        TaskDataset(task, dataset_records, lambda x: x)[0]
    skipping = vqa_task(vqa_dir, splits={"val": "val2014"}, skip_unreadable_images=True)
    with caplog.at_level("WARNING"):
        kept = skipping.read("val")
    assert [r["question_id"] for r in kept] == [70] and skipping.skipped == 1
    assert "skipped 1 records with unreadable images" in caplog.text


def test_task_config_requires_reader_and_root():
    with pytest.raises(DataError, match="missing key 'root'"):
        TaskConfig.from_dict({"reader": "vqa"}, "tasks.vqa")


def test_feature_cache_gives_the_pixel_numbers(tmp_path):
    """Sharded, memory-mapped features (several shards, one folder for two tasks) give the
    pixels' loss; a cache of another preprocessing is refused, naming what differs."""
    import torch

    from tasks.features import FeatureCache, builder_of, unique_images, write_features

    generate(tmp_path, images=40, seed=2)
    router = TaskRouter.from_yaml(tmp_path / "tasks.yaml", only=["nlvr2", "vqa"])
    model = build_model("clip-bart", "tiny").eval()
    records = [r for task in ("vqa", "nlvr2") for r in router[task].read("val")]
    transform = router.dataset("vqa", "val", model).transform
    write_features(model, unique_images(records), transform, tmp_path / "cache", shard_images=8)
    cache = FeatureCache(tmp_path / "cache", builder_of(model))
    assert len(cache.shards) > 1 and len(cache) == len(unique_images(records))
    for task in ("vqa", "nlvr2"):
        pixels = take(router.dataset(task, "val", model), [0, 1])
        cached = take(router.dataset(task, "val", model, features=cache), [0, 1])
        assert "images" not in cached and cached["features"].shape[-2:] == (4, model.feature_dim)
        assert torch.allclose(
            model.loss(pixels), model.loss(cached), atol=1e-6
        )  # batched CNN: float-level
    # another data set's image of the same file name: refused on adding and on reading
    first = Path(records[0]["images"][0])
    elsewhere = tmp_path / "gqa_like" / "images" / first.name
    elsewhere.parent.mkdir(parents=True)
    shutil.copy(first, elsewhere)
    clash = {first.name: (elsewhere, "other.json: record 'x'")}
    with pytest.raises(DataError, match=r"other.json: record 'x': image .* has the file name of"):
        write_features(model, clash, transform, tmp_path / "cache")
    with pytest.raises(DataError, match=r"was cached from .*, not .*gqa_like"):
        cache[elsewhere]
    # the same images through a symbolic link (a data set mounted elsewhere) are the same images
    (tmp_path / "linked").symlink_to(tmp_path / "coco")
    linked = tmp_path / "linked" / first.relative_to(tmp_path / "coco")
    torch.testing.assert_close(cache[linked], cache[first])
    other = build_model("clip-bart", "tiny", visual_grid=3)
    with pytest.raises(
        DataError,
        match=r"built by another model or preprocessing \(visual_grid: cache 2, model 3\)",
    ):
        FeatureCache(tmp_path / "cache", builder_of(other))


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """One small feature cache (2 shards) of the synthetic set's VQA val images, built once: each
    test works on a copy (new paths: nothing this process verified before)."""
    import torch

    from tasks.features import unique_images, write_features

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("cached")
    generate(root, images=40, seed=2)
    router = TaskRouter.from_yaml(root / "tasks.yaml", only=["vqa"])
    model = build_model("clip-bart", "tiny").eval()
    records = router["vqa"].read("val")
    transform = router.dataset("vqa", "val", model).transform
    write_features(model, unique_images(records), transform, root / "cache", shard_images=2)
    return root, router, model, records


def cache_copy(built_cache, tmp_path):
    from tasks.features import FeatureCache

    root, router, model, records = built_cache
    shutil.copytree(root / "cache", tmp_path / "cache")
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    return tmp_path / "cache", index, lambda: FeatureCache(tmp_path / "cache")


def test_a_damaged_feature_shard_is_refused_when_first_opened(built_cache, tmp_path, monkeypatch):
    """A same-size shard with a zeroed block trained silently; each shard's SHA-256 is checked the
    first time the process opens it — once: later reads and caches do not hash it again."""
    import tasks.features as features

    folder, index, open_cache = cache_copy(built_cache, tmp_path)
    shard = folder / index["shards"][1]["file"]
    assert index["format"] == "vlpeft-features/2" and len(index["shards"]) == 2
    assert index["shards"][1]["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
    hashed, real = [], features.file_sha256
    monkeypatch.setattr(features, "file_sha256", lambda p: hashed.append(p.name) or real(p))
    cache = open_cache()
    names = list(cache.keys)
    for name in names + names:
        cache[name]
    open_cache()[names[0]]
    assert sorted(hashed) == sorted(s["file"] for s in index["shards"])  # each once
    data = bytearray(shard.read_bytes())
    data[-64:] = bytes(64)  # zeros inside the tensor data: the same size, the header intact
    shard.write_bytes(bytes(data))
    victim = next(k for k, i in index["keys"].items() if i == 1)
    with pytest.raises(DataError, match=rf"{shard.name}: SHA-256 differs .* rebuild the cache"):
        open_cache()[victim]
    with pytest.raises(DataError, match=rf"{shard.name}: SHA-256 differs"):
        open_cache().check([])
    shard.write_bytes(bytes(data[:-8]))
    with pytest.raises(
        DataError, match=rf"{shard.name}: {len(data) - 8} bytes, the index recorded"
    ):
        open_cache().check([])
    shard.unlink()
    with pytest.raises(DataError, match=rf"{shard.name}: shard not found"):
        open_cache().check([])


def test_a_shard_of_another_dtype_is_refused(built_cache, tmp_path):
    """A float16 shard in a float32 cache (its checksum updated, so only the dtype tells) was
    read and upcast silently."""
    from safetensors.torch import load_file, save_file

    folder, index, open_cache = cache_copy(built_cache, tmp_path)
    shard = folder / index["shards"][0]["file"]
    save_file({k: v.half() for k, v in load_file(shard).items()}, shard)
    index["shards"][0].update(
        bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest()
    )
    (folder / "index.json").write_text(json.dumps(index))
    victim = next(k for k, i in index["keys"].items() if i == 0)
    with pytest.raises(DataError, match=rf"{shard.name}: features of '{victim}' are float16 "
                       r"\[4, \d+\], the index says float32 \[4, \d+\]"):  # fmt: skip
        open_cache()[victim]


def test_an_image_changed_since_its_features_were_cached_is_refused(built_cache, tmp_path):
    """Features of an image replaced in place were read as if it were the same image; its size
    and modification time at build time are in the index and checked on every read by path."""
    import os

    _, router, model, records = built_cache
    folder, index, open_cache = cache_copy(built_cache, tmp_path)
    dataset = router.dataset("vqa", "val", model, features=open_cache())
    dataset.check_features()  # all there, unchanged
    take(dataset, [0, 1])
    image = Path(records[0]["images"][0])
    original, stat = image.read_bytes(), image.stat()
    try:
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # touched
        with pytest.raises(DataError, match=rf"{records[0]['id']!r}: {image}: changed since its "
                           r"features were cached in .* modified .* rebuild the cache"):  # fmt: skip
            dataset[0]
        image.write_bytes(original + b"\0")  # replaced: another size
        with pytest.raises(DataError, match=rf"{image}: changed since .* \(size "
                           rf"{len(original)} → {len(original) + 1} bytes"):  # fmt: skip
            dataset.check_features()
    finally:
        image.write_bytes(original)
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    open_cache().check(p for r in records for p in r["images"])  # the same file again
    with pytest.raises(DataError, match=r"no features for image .*elsewhere.jpg"):
        open_cache().check([tmp_path / "elsewhere.jpg"])


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/x.safetensors", "sub/x.safetensors"])
def test_a_cache_index_naming_a_shard_outside_its_folder_is_refused(built_cache, tmp_path, name):
    folder, index, open_cache = cache_copy(built_cache, tmp_path)
    index["shards"][0]["file"] = name
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=rf"index.json: shard '{name}' is not a file name inside"):
        open_cache()


def test_a_cache_of_the_first_format_asks_for_a_rebuild(built_cache, tmp_path):
    """Format 1 carried no checksums and no image sizes: refused, asking for a rebuild (reading
    it unchecked would be the blind trust format 2 ends)."""
    folder, index, open_cache = cache_copy(built_cache, tmp_path)
    index["format"] = "vlpeft-features/1"
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"format 'vlpeft-features/1', expected 'vlpeft-features/2'"
                       r" .* rebuild it with python -m launch.features"):  # fmt: skip
        open_cache()


def test_router_activation_restores_the_configured_routing(tmp_path):
    """A task that names no routing function runs the set's own, not the previous task's."""
    import vlpeft

    router = TaskRouter.from_dict(
        {
            "a": {"reader": "gqa", "root": ".", "routing": "add"},
            "b": {"reader": "gqa", "root": "."},
        },
        tmp_path,
    )
    model = vlpeft.build_model("clip-bart", "tiny")
    vlpeft.add_adapter(
        model, model.adapter_config(vlpeft.LoRAConfig(targets=["_"], r=2, routing="mul"))
    )
    kinds = lambda: {a.routing.kind for _, layer in vlpeft.adapted_layers(model)  # noqa: E731
                     for a in layer.adapters.values() if a.routing is not None}  # fmt: skip
    router.activate(model, "a")
    assert kinds() == {"add"}
    router.activate(model, "b")
    assert kinds() == {"mul"}


def test_vqa_duplicate_ids_and_answer_counts_are_errors(vqa_dir):
    questions = vqa_dir / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json"
    annotations = vqa_dir / "vqa" / "v2_mscoco_val2014_annotations.json"
    original_q, original_a = json.loads(questions.read_text()), json.loads(annotations.read_text())
    twice = {"questions": original_q["questions"] + original_q["questions"][:1]}
    write(questions, twice)
    with pytest.raises(DataError, match=r"questions\[2\]: duplicate question_id 420"):
        vqa_task(vqa_dir, splits={"val": "val2014"}).read("val")
    write(questions, original_q)
    write(annotations, {"annotations": original_a["annotations"] + original_a["annotations"][:1]})
    with pytest.raises(DataError, match="a second annotation for question_id 420"):  # not last-wins
        vqa_task(vqa_dir, splits={"val": "val2014"}).read("val")
    short = json.loads(json.dumps(original_a))
    short["annotations"][1]["answers"] = short["annotations"][1]["answers"][:3]
    write(annotations, short)
    with pytest.raises(
        DataError, match="question_id 70: 3 answers, the official metric assumes 10"
    ):
        vqa_task(vqa_dir, splits={"val": "val2014"}).read("val")
    task = vqa_task(vqa_dir, splits={"val": "val2014"}, options={"allow_fewer_answers": True})
    assert len(task.read("val")[1]["answers"]) == 3


def test_bad_input_the_readers_see_is_a_clear_error(tmp_path):
    """Non-UTF-8 files, an NLVR² identifier without dashes and a string cocoid name their file and
    field (they were a UnicodeDecodeError, an IndexError and an accepted id)."""
    (tmp_path / "dev.json").write_bytes(
        '{"identifier": "dev-1-0-0", "sentence": "café"}\n'.encode("latin-1")
    )
    router = TaskRouter.from_dict(
        {"n": {"reader": "nlvr2", "root": ".", "splits": {"val": "dev"}}}, tmp_path
    )
    with pytest.raises(DataError, match=r"dev.json: not UTF-8 text"):
        router["n"].read("val")
    write(
        tmp_path / "dev.json",
        json.dumps({"identifier": "dev1", "sentence": "x", "label": "True"}) + "\n",
    )
    with pytest.raises(DataError, match=r"line 1: field 'identifier' 'dev1' is not"):
        router["n"].read("val")
    write(
        tmp_path / "dataset_coco.json",
        {"images": [{"cocoid": "42", "imgid": 1, "filename": "a.jpg", "split": "test",
                     "sentences": [{"raw": "a cat"}]}]},
    )  # fmt: skip
    caption = TaskRouter.from_dict({"c": {"reader": "caption", "root": "."}}, tmp_path)["c"]
    with pytest.raises(DataError, match=r"images\[0\]: field 'cocoid' should be"):
        caption.read("test")


def test_truncated_jpegs_are_caught_and_tasks_check_lists_every_problem(tmp_path, capsys):
    """A JPEG cut at 60 % passes Image.verify; the full decode refuses it. With
    skip_unreadable_images it is skipped and counted up front (never a crash mid-training), and
    ``python -m tasks.check`` lists every problem of the data set at once."""
    from PIL import Image

    from tasks.check import main as check_main
    from tasks.synthetic import generate

    generate(tmp_path, images=12, seed=0, size=32)
    router = TaskRouter.from_yaml(tmp_path / "tasks.yaml")
    records = router["caption"].read("test")
    victim = records[0]["images"][0]
    buffer = __import__("io").BytesIO()
    noise = __import__("numpy").random.RandomState(0).randint(0, 256, (240, 320, 3))
    Image.fromarray(noise.astype("uint8")).save(buffer, "JPEG", quality=90)
    # PIL reads the format from the bytes, whatever the file's name
    victim.write_bytes(buffer.getvalue()[: int(len(buffer.getvalue()) * 0.6)])
    with Image.open(victim) as image:
        image.verify()  # what the old check did: it passes
    skipping = TaskRouter.from_dict(
        {"c": {**router["caption"].config.__dict__, "skip_unreadable_images": True}}, "/"
    )["c"]
    kept = skipping.read("test")
    assert victim not in [p for r in kept for p in r["images"]] and skipping.skipped == 1
    (tmp_path / "gqa" / "val_balanced_questions.json").write_text("{")  # a second problem
    assert check_main([str(tmp_path / "tasks.yaml")]) == 1
    out = capsys.readouterr().out
    assert "does not decode" in out and "malformed JSON" in out
