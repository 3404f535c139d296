"""The built-in synthetic VL data set: coloured shapes, written in the official file formats.

    python -m tasks.synthetic --out DIR [--images N --seed S --size PX]

Each image shows one to three shapes (circle, square, triangle), each with a colour (red, green,
blue, yellow), a size (small, large) and a column (left, middle, right). Every answer is
determined by the image, so a model can learn it. Written under DIR:

- ``coco/dataset_coco.json`` (Karpathy format: train / restval / val / test) and the images in
  ``coco/images/{train2014,val2014}/COCO_<split>_<id:012d>.jpg``; 5 captions per image in varied
  wording (captioning and retrieval; VQA's Karpathy splits) — written here, shared by three tasks;
- each registered task's own files, by its writer (:class:`Writer`, in the task's file): VQA
  ``vqa/v2_OpenEnded_mscoco_{train2014,val2014}_questions.json`` + ``v2_mscoco_*_annotations.json``
  (colour, count, yes/no and position questions with 10 answers each, a little annotator noise);
  GQA ``gqa/{train,val,testdev}_balanced_questions.json`` + ``gqa/images/<imageId>.jpg``
  (relational questions with answer and fullAnswer); NLVR² ``nlvr2/{train,dev,test1}.json`` (JSON
  Lines) + ``nlvr2/images/<split>/<id>-img{0,1}.png`` (statements about image pairs, half True);
- ``tasks.yaml``: a task-router config reading all of the above (each writer's ``entry``).

Deterministic for a seed: one random stream, drawn from in a fixed order (the scenes, then per
scene its captions and each writer's :meth:`Writer.scene`, then each writer's
:meth:`Writer.finish`; writers in their ``order``). The readers in ``tasks/`` read it through the
same code as real files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path
from typing import ClassVar

from PIL import Image, ImageDraw

from .base import get_task, list_tasks

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 30),
}
SIZES = ("small", "large")
COLUMNS = ("left", "middle", "right")
NUMBERS = {1: "one", 2: "two", 3: "three"}


def draw_scene(rng: random.Random) -> list[dict]:
    n = rng.randint(1, 3)  # distinct shapes in distinct columns: "the circle" is always one object
    columns, shapes = sorted(rng.sample(range(3), n)), rng.sample(SHAPES, n)
    return [
        {"shape": s, "colour": rng.choice(list(COLOURS)), "size": rng.choice(SIZES), "column": c}
        for s, c in zip(shapes, columns)
    ]


def render(scene: list[dict], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 245))
    pen = ImageDraw.Draw(image)
    cell = size / 3
    for obj in scene:
        radius = cell * (0.42 if obj["size"] == "large" else 0.22)
        cx, cy = cell * obj["column"] + cell / 2, size / 2
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        colour = COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            pen.ellipse(box, fill=colour)
        elif obj["shape"] == "square":
            pen.rectangle(box, fill=colour)
        else:
            pen.polygon(
                [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
                fill=colour,
            )
    return image


def describe(obj: dict, size: bool = True) -> str:
    return " ".join(w for w in (obj["size"] if size else "", obj["colour"], obj["shape"]) if w)


def plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def captions(scene: list[dict], rng: random.Random) -> list[str]:
    parts = [describe(o) for o in scene]
    joined = " and ".join(f"a {p}" for p in parts)
    n = len(scene)
    located = ", ".join(f"a {describe(o, False)} on the {COLUMNS[o['column']]}" for o in scene)
    colours = sorted({o["colour"] for o in scene})
    return [
        joined,
        f"an image with {NUMBERS[n]} {plural('shape', n)}: {joined}",
        f"there is {located}",
        f"{NUMBERS[n]} {plural('shape', n)} coloured {' and '.join(colours)}",
        f"a picture showing {' , '.join(describe(o, False) for o in rng.sample(scene, n))}",
    ]


def coco_folder(split: str) -> str:
    """The COCO image folder of a scene's Karpathy split (train2014, or val2014 for the rest)."""
    return "train2014" if split == "train" else "val2014"


def karpathy_splits(images: int) -> list[str]:
    """The Karpathy split of each scene: the last tenth (at least 4) test, then val, restval."""
    splits = ["train"] * images
    n_eval = max(4, images // 10)
    for i in range(n_eval):
        splits[-1 - i], splits[-1 - n_eval - i], splits[-1 - 2 * n_eval - i] = (
            "test",
            "val",
            "restval",
        )
    return splits


# -- the writers' hook ----------------------------------------------------------------------------
@dataclasses.dataclass
class SyntheticSet:
    """What every writer gets: where the set goes, its scenes and the one random stream.

    Args:
        out: the data set's folder.
        scenes: the scenes (lists of shapes), image id ``i + 1`` for ``scenes[i]``.
        splits: each scene's Karpathy split (train, restval, val, test).
        size: the image side in pixels.
        rng: the stream every writer draws from, in the documented order.
    """

    out: Path
    scenes: list[list[dict]]
    splits: list[str]
    size: int
    rng: random.Random


class Writer:
    """A task's part of the synthetic set; the task class names it as ``synthetic_writer``.

    :func:`generate` calls the writers of every registered task, sorted by ``order``:
    ``scene(...)`` for each scene (after the shared COCO image and captions of that scene), then
    ``finish()`` once. All draw from one stream, so a writer's place decides the data of the
    writers after it: the built-in tasks have places 0–4 (their data stay the same from version to
    version); a new task takes a higher place.

    Attributes:
        order: the writer's place; also the task's place in ``tasks.yaml``.
        entry: the task's ``tasks.yaml`` entry (:class:`tasks.base.TaskConfig` fields; paths
            relative to the set's folder; values are plain words or one-level mappings).

    Example (in a task's file; its task class sets ``synthetic_writer = SyntheticCount``):
        >>> class SyntheticCount(Writer):
        ...     order = 10
        ...     entry = {"reader": "count", "root": "count"}
        ...     def finish(self):
        ...         counts = [len(scene) for scene in self.data.scenes]
        ...         write_json(self.data.out / "count" / "train.json", counts)
        ...         return {"count_questions": len(counts)}
    """

    order: ClassVar[int] = 100
    entry: ClassVar[dict] = {}

    def __init__(self, data: SyntheticSet) -> None:
        self.data = data

    def scene(self, image_id: int, scene: list[dict], split: str, picture: Image.Image) -> None:
        """Called for each scene in image order, ``picture`` its rendered image."""

    def finish(self) -> dict[str, int]:
        """Writes the task's files; returns what it wrote, counted (``{"vqa_questions": 1500}``)."""
        return {}


def writers(data: SyntheticSet) -> dict[str, Writer]:
    """Task name → its writer, for every registered task that has one, in writer order."""
    classes = {name: get_task(name).synthetic_writer for name in list_tasks()}
    ordered = sorted((cls.order, name) for name, cls in classes.items() if cls is not None)
    return {name: classes[name](data) for _, name in ordered}


def coco_image(out: Path, image_id: int, scene: list[dict], split: str, picture, rng) -> dict:
    """Saves the scene's COCO image; its Karpathy record with 5 captions (drawn from ``rng``)."""
    folder = coco_folder(split)
    filename = f"COCO_{folder}_{image_id:012d}.jpg"
    path = out / "coco" / "images" / folder / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, quality=95)
    sentences = [
        {"raw": c, "tokens": c.split(), "imgid": image_id - 1, "sentid": 5 * (image_id - 1) + j}
        for j, c in enumerate(captions(scene, rng))
    ]
    return {
        "filepath": folder,
        "filename": filename,
        "cocoid": image_id,
        "imgid": image_id - 1,
        "split": split,
        "sentids": [s["sentid"] for s in sentences],
        "sentences": sentences,
    }


def generate(out: Path, images: int = 300, seed: int = 0, size: int = 64) -> dict[str, int]:
    """Writes the data set under ``out``; returns counts per file family.

    Example:
        >>> generate(Path("/tmp/shapes"), images=40)  # doctest: +SKIP
        {'images': 40, 'vqa_questions': 200, 'gqa_questions': 120, 'nlvr2_statements': 80}
    """
    rng = random.Random(seed)
    scenes = [draw_scene(rng) for _ in range(images)]
    data = SyntheticSet(out, scenes, karpathy_splits(images), size, rng)
    tasks = writers(data)
    karpathy = []
    for image_id, (scene, split) in enumerate(zip(scenes, data.splits), 1):
        picture = render(scene, size)
        karpathy.append(coco_image(out, image_id, scene, split, picture, rng))
        for writer in tasks.values():
            writer.scene(image_id, scene, split, picture)
    write_json(out / "coco" / "dataset_coco.json", {"images": karpathy, "dataset": "coco"})
    counts = {"images": images}
    for writer in tasks.values():
        counts.update(writer.finish())
    write_tasks_yaml(out, {name: writer.entry for name, writer in tasks.items()})
    return counts


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def write_tasks_yaml(out: Path, entries: dict[str, dict]) -> None:
    """A router config for the synthetic set: each task's entry (paths relative to its folder)."""
    lines = ["# Task-router config for the synthetic set written by `python -m tasks.synthetic`."]
    for name, entry in entries.items():
        lines.append(f"{name}:")
        for key, value in entry.items():
            if isinstance(value, dict):  # a flow mapping, one line: {train: train, val: dev}
                value = "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
            lines.append(f"  {key}: {value}")
    (out / "tasks.yaml").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write the synthetic VL data set in the official formats."
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--images", type=int, default=300, help="number of scenes (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    args = parser.parse_args(argv)
    if args.images < 40:
        parser.error("--images must be at least 40 (every split needs images)")
    counts = generate(args.out, args.images, args.seed, args.size)
    print(f"wrote {args.out}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
