"""The built-in synthetic VL data set: coloured shapes, written in the official file formats.

    python -m tasks.synthetic --out DIR [--images N --seed S --size PX]

Each image shows one to three shapes (circle, square, triangle), each with a colour (red, green,
blue, yellow), a size (small, large) and a column (left, middle, right). Every answer is
determined by the image, so a model can learn it. Written under DIR:

- ``coco/dataset_coco.json`` (Karpathy format: train / restval / val / test) and the images in
  ``coco/images/{train2014,val2014}/COCO_<split>_<id:012d>.jpg``; 5 captions per image in varied
  wording (captioning and retrieval);
- ``vqa/v2_OpenEnded_mscoco_{train2014,val2014}_questions.json`` + ``v2_mscoco_*_annotations.json``:
  colour, count, yes/no and position questions with 10 answers each (a little annotator noise);
- ``gqa/{train,val,testdev}_balanced_questions.json`` + ``gqa/images/<imageId>.jpg``: relational
  questions (left of, bigger than) with answer and fullAnswer;
- ``nlvr2/{train,dev,test1}.json`` (JSON Lines) + ``nlvr2/images/<split>/<id>-img{0,1}.png``:
  statements about image pairs, half True, half False;
- ``tasks.yaml``: a task-router config reading all of the above.

Deterministic for a seed. The readers in ``tasks/`` read it through the same code as real files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

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


def answers_with_noise(answer: str, pool: list[str], rng: random.Random) -> list[str]:
    """Ten annotator answers: mostly the right one, up to two others (soft scores get exercised)."""
    noisy = rng.choice([0, 0, 0, 1, 2])
    wrong = [a for a in pool if a != answer] or [answer]
    return [answer] * (10 - noisy) + [rng.choice(wrong) for _ in range(noisy)]


def vqa_questions(
    scene: list[dict], rng: random.Random
) -> list[tuple[str, str, str, str, list[str]]]:
    """(question, answer, answer_type, question_type, answer pool) — colour, count, yes/no, position."""
    shapes = [o["shape"] for o in scene]
    unique = [o for o in scene if shapes.count(o["shape"]) == 1]
    out = []
    if unique:
        obj = rng.choice(unique)
        out.append(
            (
                f"what color is the {obj['shape']}?",
                obj["colour"],
                "other",
                "what color is the",
                list(COLOURS),
            )
        )
        out.append(
            (
                f"where is the {obj['shape']}?",
                COLUMNS[obj["column"]],
                "other",
                "where is the",
                list(COLUMNS),
            )
        )
    colour = rng.choice(list(COLOURS))
    count = sum(o["colour"] == colour for o in scene)
    out.append(
        (
            f"how many {colour} shapes are there?",
            str(count),
            "number",
            "how many",
            ["0", "1", "2", "3"],
        )
    )
    out.append(
        ("how many shapes are there?", str(len(scene)), "number", "how many", ["1", "2", "3"])
    )
    probe = (
        rng.choice(scene)
        if rng.random() < 0.5
        else {"colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES)}
    )
    present = any(o["colour"] == probe["colour"] and o["shape"] == probe["shape"] for o in scene)
    out.append(
        (
            f"is there a {probe['colour']} {probe['shape']}?",
            "yes" if present else "no",
            "yes/no",
            "is there a",
            ["yes", "no"],
        )
    )
    return out


def gqa_questions(scene: list[dict], rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, answer, fullAnswer) about relations between shapes."""
    out = []
    for left, right in zip(scene, scene[1:]):
        out.append(
            (
                f"what color is the shape to the left of the {right['shape']}?",
                left["colour"],
                f"the {left['shape']} is {left['colour']}.",
            )
        )
        bigger = "yes" if left["size"] == "large" and right["size"] == "small" else "no"
        out.append(
            (
                f"is the {left['shape']} bigger than the {right['shape']}?",
                bigger,
                f"{bigger}, the {left['shape']} is {'bigger' if bigger == 'yes' else 'not bigger'}.",
            )
        )
    obj = scene[-1]
    out.append(
        (
            f"what shape is on the {COLUMNS[obj['column']]}?",
            obj["shape"],
            f"it is a {obj['shape']}.",
        )
    )
    return out


def nlvr_statement(left: list[dict], right: list[dict], truth: bool, rng: random.Random) -> str:
    """A statement about the pair that is ``truth`` (tries templates until one fits)."""
    both = left + right
    for _ in range(50):
        kind = rng.randrange(4)
        if kind == 0:
            shape = rng.choice(SHAPES)
            n = sum(o["shape"] == shape for o in both)
            k = n if truth else rng.choice([m for m in range(1, 7) if m != n])
            return f"there are {k} {plural(shape, k)} in total"
        if kind == 1:
            colour = rng.choice(list(COLOURS))
            if any(o["colour"] == colour for o in left) == truth:
                return f"the left image contains a {colour} shape"
        if kind == 2:
            shape = rng.choice(SHAPES)
            holds = any(o["shape"] == shape for o in left) and any(
                o["shape"] == shape for o in right
            )
            if holds == truth:
                return f"both images contain a {shape}"
        if kind == 3 and len(left) != len(right) and (len(left) > len(right)) == truth:
            return "there are more shapes in the left image than in the right image"
    raise RuntimeError("no statement found")  # unreachable: kind 0 always returns


def generate(out: Path, images: int = 300, seed: int = 0, size: int = 64) -> dict[str, int]:
    """Writes the data set under ``out``; returns counts per file family."""
    rng = random.Random(seed)
    scenes = [draw_scene(rng) for _ in range(images)]
    splits = ["train"] * images
    n_eval = max(4, images // 10)
    for i in range(n_eval):
        splits[-1 - i], splits[-1 - n_eval - i], splits[-1 - 2 * n_eval - i] = (
            "test",
            "val",
            "restval",
        )
    coco_split = {
        s: ("train2014" if s == "train" else "val2014") for s in ("train", "restval", "val", "test")
    }
    counts = {"images": images}

    karpathy, questions, annotations = (
        [],
        {"train2014": [], "val2014": []},
        {"train2014": [], "val2014": []},
    )
    for image_id, (scene, split) in enumerate(zip(scenes, splits), 1):
        folder = coco_split[split]
        filename = f"COCO_{folder}_{image_id:012d}.jpg"
        path = out / "coco" / "images" / folder / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        picture = render(scene, size)
        picture.save(path, quality=95)
        (out / "gqa" / "images").mkdir(parents=True, exist_ok=True)
        picture.save(out / "gqa" / "images" / f"{image_id}.jpg", quality=95)
        sentences = [
            {"raw": c, "tokens": c.split(), "imgid": image_id - 1, "sentid": 5 * (image_id - 1) + j}
            for j, c in enumerate(captions(scene, rng))
        ]
        karpathy.append(
            {
                "filepath": folder,
                "filename": filename,
                "cocoid": image_id,
                "imgid": image_id - 1,
                "split": split,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
        for j, (q, a, a_type, q_type, pool) in enumerate(vqa_questions(scene, rng)):
            qid = image_id * 100 + j
            questions[folder].append({"image_id": image_id, "question": q, "question_id": qid})
            given = answers_with_noise(a, pool, rng)
            annotations[folder].append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "question_type": q_type,
                    "answer_type": a_type,
                    "multiple_choice_answer": a,
                    "answers": [
                        {"answer": x, "answer_confidence": "yes", "answer_id": k + 1}
                        for k, x in enumerate(given)
                    ],
                }
            )
    write_json(out / "coco" / "dataset_coco.json", {"images": karpathy, "dataset": "coco"})
    for folder in questions:
        write_json(
            out / "vqa" / f"v2_OpenEnded_mscoco_{folder}_questions.json",
            {
                "info": {"description": "vlpeft synthetic"},
                "task_type": "Open-Ended",
                "data_type": "mscoco",
                "data_subtype": folder,
                "questions": questions[folder],
            },
        )
        write_json(
            out / "vqa" / f"v2_mscoco_{folder}_annotations.json",
            {
                "info": {"description": "vlpeft synthetic"},
                "data_type": "mscoco",
                "data_subtype": folder,
                "annotations": annotations[folder],
            },
        )
    counts["vqa_questions"] = sum(map(len, questions.values()))

    gqa_split = {"train": "train", "restval": "train", "val": "val", "test": "testdev"}
    gqa = {"train": {}, "val": {}, "testdev": {}}
    for image_id, (scene, split) in enumerate(zip(scenes, splits), 1):
        for j, (q, a, full) in enumerate(gqa_questions(scene, rng)):
            gqa[gqa_split[split]][f"{image_id}{j:02d}"] = {
                "imageId": str(image_id),
                "question": q,
                "answer": a,
                "fullAnswer": full,
                "isBalanced": True,
                "types": {"structural": "query", "semantic": "rel", "detailed": "relation"},
            }
    for name, data in gqa.items():
        write_json(out / "gqa" / f"{name}_balanced_questions.json", data)
    counts["gqa_questions"] = sum(map(len, gqa.values()))

    nlvr_split = {"train": "train", "restval": "train", "val": "dev", "test": "test1"}
    rows = {"train": [], "dev": [], "test1": []}
    pools = {name: [i for i, s in enumerate(splits) if nlvr_split[s] == name] for name in rows}
    for name, pool in pools.items():
        for pair in range(len(pool)):
            a, b = rng.sample(pool, 2)
            stem = f"{name}-{pair}-0"
            folder = out / "nlvr2" / "images" / name
            folder.mkdir(parents=True, exist_ok=True)
            render(scenes[a], size).save(folder / f"{stem}-img0.png")
            render(scenes[b], size).save(folder / f"{stem}-img1.png")
            for k, truth in enumerate(rng.sample([True, False], 2)):
                rows[name].append(
                    {
                        "identifier": f"{stem}-{k}",
                        "sentence": nlvr_statement(scenes[a], scenes[b], truth, rng),
                        "label": str(truth),
                        "left_url": "",
                        "right_url": "",
                        "synset": "",
                        "query": "",
                    }
                )
    for name, data in rows.items():
        path = out / "nlvr2" / f"{name}.json"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
    counts["nlvr2_statements"] = sum(map(len, rows.values()))
    write_tasks_yaml(out)
    return counts


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def write_tasks_yaml(out: Path) -> None:
    """A router config for the synthetic set (paths relative to the YAML file's folder)."""
    text = """\
# Task-router config for the synthetic set written by `python -m tasks.synthetic`.
vqa:
  reader: vqa
  root: vqa
  images: coco/images
  splits: {train: karpathy_train, val: karpathy_val, test: karpathy_test}
  options: {karpathy: coco/dataset_coco.json}
gqa:
  reader: gqa
  root: gqa
  images: gqa/images
  splits: {train: train, val: val, test: testdev}
nlvr2:
  reader: nlvr2
  root: nlvr2
  images: nlvr2/images
  splits: {train: train, val: dev, test: test1}
caption:
  reader: caption
  root: coco
  images: coco/images
retrieval:
  reader: retrieval
  root: coco
  images: coco/images
"""
    (out / "tasks.yaml").write_text(text)


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
