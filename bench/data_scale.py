"""The data path at the papers' data-set sizes: ``python -m bench.data_scale [--scale 1.0]``.

Writes annotation files in the official formats at the public data sets' sizes times ``--scale``
(VQAv2 train2014 443,757 + val2014 214,354 questions with 10 answers each; Karpathy
``dataset_coco.json`` 123,287 images × 5 captions; GQA ``train_balanced`` 943,000 +
``testdev_balanced`` 12,578 questions; NLVR² 86,373 / 6,982 / 6,967 statements), random text,
every image a symbolic link to one small JPEG. Then, each in a fresh process, side by side:

- the floor: ``json.load`` of every distinct annotation file once;
- reading every split (train/val/test) of the four tasks through ``router[t].read(s)``, cold (no
  record cache) and warm (cached);
- the training process's memory for the records of the four train splits;
- ``launch.train`` on the four tasks (tiny model, 5 steps, no evaluation): wall time and peak RSS,
  cold and warm;
- the private memory of each of 2 DataLoader workers over one epoch of GQA train (batch 64).

Results: ``bench/results/data_scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import vlpeft
from bench.common import machine, report, write
from tasks.base import DataLoader
from tasks.router import TaskRouter

SIZES = {
    "vqa_train2014": 443_757, "vqa_val2014": 214_354, "coco_train2014_images": 82_783,
    "coco_val2014_images": 40_504, "karpathy_val": 5_000, "karpathy_test": 5_000,
    "gqa_train": 943_000, "gqa_testdev": 12_578, "gqa_val": 132_062, "gqa_images": 72_140,
    "nlvr2_train": 86_373, "nlvr2_dev": 6_982, "nlvr2_test1": 6_967,
}  # fmt: skip
WORDS = [f"w{i}" for i in range(5000)]
TYPES = ["yes/no", "number", "other"]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def link(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_symlink():
        path.symlink_to(target)


def generate(out: Path, scale: float, seed: int = 0) -> Path:
    """The four tasks' files at ``scale`` × the data sets' sizes; returns the tasks.yaml."""
    from PIL import Image

    rng = random.Random(seed)
    n = {k: max(4, int(v * scale)) for k, v in SIZES.items()}
    image = out / "one.jpg"
    out.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (120, 80, 40)).save(image)
    coco = out / "coco" / "images"
    # COCO: images of train2014 and val2014, the Karpathy split over them, 5 captions each
    ids = {"train2014": list(range(1, n["coco_train2014_images"] + 1))}
    ids["val2014"] = list(range(10**6, 10**6 + n["coco_val2014_images"]))
    karpathy = []
    for split, image_ids in ids.items():
        for image_id in image_ids:
            name = f"COCO_{split}_{image_id:012d}.jpg"
            link(coco / split / name, image)
            karpathy.append({"filepath": split, "filename": name, "cocoid": image_id,
                             "split": "train" if split == "train2014" else "restval",
                             "sentences": [{"raw": sentence(rng, 10)} for _ in range(5)]})  # fmt: skip
    for i, which in enumerate(("val", "test")):
        for entry in karpathy[-(i + 1) * n[f"karpathy_{which}"] :][: n[f"karpathy_{which}"]]:
            entry["split"] = which
    write_json(out / "coco" / "dataset_coco.json", {"images": karpathy, "dataset": "coco"})
    # VQAv2: questions and annotations (10 answers) over the COCO images
    for split, image_ids in ids.items():
        questions, annotations = [], []
        for qid in range(n[f"vqa_{split}"]):
            image_id = image_ids[qid % len(image_ids)]
            question_id = image_id * 10 + qid // len(image_ids)
            questions.append(
                {
                    "image_id": image_id,
                    "question": sentence(rng, 7) + "?",
                    "question_id": question_id,
                }
            )
            answers = [rng.choice(WORDS[:3000]) for _ in range(10)]
            annotations.append({
                "question_id": question_id, "image_id": image_id, "answer_type": rng.choice(TYPES),
                "question_type": " ".join(rng.choices(WORDS[:50], k=2)),
                "multiple_choice_answer": answers[0],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                            for j, a in enumerate(answers)],
            })  # fmt: skip
        write_json(out / "vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json",
                   {"questions": questions})  # fmt: skip
        write_json(
            out / "vqa" / f"v2_mscoco_{split}_annotations.json", {"annotations": annotations}
        )
    # GQA balanced questions over its images
    gqa_images = [f"n{i}" for i in range(n["gqa_images"])]
    for name in gqa_images:
        link(out / "gqa" / "images" / f"{name}.jpg", image)
    for split, key in (("train", "gqa_train"), ("val", "gqa_val"), ("testdev", "gqa_testdev")):
        questions = {
            f"{split}{i}": {"imageId": gqa_images[i % len(gqa_images)],
                            "question": sentence(rng, 8) + "?", "answer": rng.choice(WORDS[:1800]),
                            "fullAnswer": sentence(rng, 6), "types": {"structural": "query"}}
            for i in range(n[key])
        }  # fmt: skip
        write_json(out / "gqa" / f"{split}_balanced_questions.json", questions)
    # NLVR²: JSON Lines, two images per statement (four statements per pair of images)
    for split in ("train", "dev", "test1"):
        lines = []
        for i in range(n[f"nlvr2_{split}"]):
            pair, k = divmod(i, 4)
            stem = f"{split}-{pair // 50}-{pair % 50}"
            for side in (0, 1):
                link(out / "nlvr2" / "images" / split / f"{stem}-img{side}.png", image)
            lines.append(json.dumps({"identifier": f"{stem}-{k}", "sentence": sentence(rng, 12),
                                     "label": rng.choice(["True", "False"])}))  # fmt: skip
        (out / "nlvr2" / f"{split}.json").write_text("\n".join(lines) + "\n")
    tasks = out / "tasks.yaml"
    tasks.write_text(
        "vqa: {reader: vqa, root: vqa, images: coco/images, options: {karpathy: coco/dataset_coco.json},\n"
        "      splits: {train: karpathy_train, val: karpathy_val, test: karpathy_test}}\n"
        "gqa: {reader: gqa, root: gqa, images: gqa/images, splits: {train: train, val: val, test: testdev}}\n"
        "nlvr2: {reader: nlvr2, root: nlvr2, images: nlvr2/images, splits: {train: train, val: dev, test: test1}}\n"
        "caption: {reader: caption, root: coco, images: coco/images}\n"
    )
    return tasks


# -- measurements, each in a fresh process ----------------------------------------------------
def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def private_mb(pid: int) -> float:
    """A process's private memory (pages no other process shares: Private_Clean + _Dirty)."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total / 1024


def child_floor(tasks_yaml: Path) -> dict:
    root = tasks_yaml.parent
    files = [p for p in sorted(root.rglob("*.json")) if ".vlpeft_cache" not in p.parts]
    begin = time.perf_counter()
    for path in files:
        if path.parent.name == "nlvr2":
            [json.loads(line) for line in path.read_text().splitlines() if line]
        else:
            json.loads(path.read_text())
    return {"seconds": time.perf_counter() - begin, "files": len(files)}


def child_read(tasks_yaml: Path) -> dict:
    router = TaskRouter.from_yaml(tasks_yaml)
    before = rss_mb()
    begin = time.perf_counter()
    held, counts = {}, {}
    for name in router.tasks:
        for split in ("train", "val", "test"):
            records = router[name].read(split)
            counts[f"{name}/{split}"] = len(records)
            if split == "train":
                held[name] = records
    seconds = time.perf_counter() - begin
    train_records = sum(len(r) for r in held.values())
    return {"seconds": seconds, "records": counts, "train_records": train_records,
            "train_records_mb": rss_mb() - before}  # fmt: skip


def child_workers(tasks_yaml: Path, fraction: float) -> dict:
    router = TaskRouter.from_yaml(tasks_yaml, only=["gqa"])
    model = vlpeft.build_model("roberta-vit", "tiny")
    dataset = router.dataset("gqa", "train", model)
    batches = max(2, int(len(dataset) / 64 * fraction))
    sampler = torch.utils.data.BatchSampler(range(len(dataset)), 64, drop_last=False)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2, collate_fn=dataset.collate)
    workers, samples = [], []
    import psutil  # (a dependency of DeepSpeed's)

    for i, _ in enumerate(loader):
        if i == 0:  # the loader's worker processes: this process's children
            workers = [c.pid for c in psutil.Process().children()]
            first = [private_mb(p) for p in workers]
        if i and i % max(1, batches // 8) == 0:
            samples.append({"batch": i, "private_mb": [private_mb(p) for p in workers]})
        if i + 1 >= batches:  # (while the workers live: they end with the loader)
            last = [private_mb(p) for p in workers]
            break
    return {"batches": batches, "records": batches * 64, "first_mb": first, "last_mb": last,
            "growth_mb": max(b - a for a, b in zip(first, last)), "samples": samples}  # fmt: skip


def run_child(what: str, tasks_yaml: Path, *extra: str) -> dict:
    command = [sys.executable, "-m", "bench.data_scale", "--child", what, str(tasks_yaml), *extra]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{what}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def first_steps(tasks_yaml: Path, run_dir: Path) -> dict:
    """``launch.train`` on the four tasks, tiny model, 5 steps, no evaluation: wall, peak RSS."""
    config = {
        "model": {"family": "clip-bart", "preset": "tiny", "overrides": {"image_size": 32}},
        "adapters": {"default": {"method": "lora", "r": 4}},
        "data": {"file": str(tasks_yaml), "tasks": {t: {"batch_size": 8} for t in
                                                   ("vqa", "gqa", "nlvr2", "caption")}},
        "train": {"steps": 5, "checkpoint_every": 0, "tensorboard": False, "log_every": 5},
        "eval": {"splits": []},
    }  # fmt: skip
    path = run_dir.with_suffix(".yaml")
    path.write_text(json.dumps(config))
    shutil.rmtree(run_dir, ignore_errors=True)  # this benchmark's own run of an earlier call
    begin = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "launch.train", "--config", str(path), "--out", str(run_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - begin
    if status != 0:
        raise RuntimeError(f"launch.train failed: {process.stderr.read()[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None, help="data folder (default: a temp one)")
    parser.add_argument("--epoch", type=float, default=1.0, help="fraction of the GQA epoch")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        what, tasks_yaml, *extra = args.child
        work = {"floor": child_floor, "read": child_read}.get(what)
        result = (
            work(Path(tasks_yaml)) if work else child_workers(Path(tasks_yaml), float(extra[0]))
        )
        print(json.dumps(result))
        return result
    out = args.out or Path(tempfile.mkdtemp(prefix="data_scale_"))
    begin = time.perf_counter()
    stamp = out / "scale.json"  # files of this scale written before: reused
    if stamp.is_file() and json.loads(stamp.read_text()) == {"scale": args.scale}:
        tasks_yaml = out / "tasks.yaml"
    else:
        tasks_yaml = generate(out, args.scale)
        stamp.write_text(json.dumps({"scale": args.scale}))
    made = time.perf_counter() - begin
    cache = out / ".vlpeft_cache"
    shutil.rmtree(cache, ignore_errors=True)
    results = {"scale": args.scale, "generate_s": made, "machine": machine("cpu")}
    results["floor"] = run_child("floor", tasks_yaml)
    results["cold"] = run_child("read", tasks_yaml)
    results["warm"] = run_child("read", tasks_yaml)
    shutil.rmtree(cache, ignore_errors=True)
    results["train_cold"] = first_steps(tasks_yaml, out / "run_cold")
    results["train_warm"] = first_steps(tasks_yaml, out / "run_warm")
    results["workers"] = run_child("workers", tasks_yaml, str(args.epoch))
    floor = results["floor"]["seconds"]
    figures = [
        ("cold read, every split of the four tasks", "≤ 2 × floor",
         f"{results['cold']['seconds']:.1f} s (floor {floor:.1f} s)",
         results["cold"]["seconds"], 2 * floor),
        ("warm read (record cache)", "≤ 5 s", f"{results['warm']['seconds']:.1f} s",
         results["warm"]["seconds"], 5.0),
        ("records of the four train splits in memory", "≤ 1 GB",
         f"{results['warm']['train_records_mb']:.0f} MB for {results['warm']['train_records']:,}",
         results["warm"]["train_records_mb"], 1024),
        ("launch.train to the end of 5 steps, warm", "≤ 30 s",
         f"{results['train_warm']['seconds']:.1f} s (cold {results['train_cold']['seconds']:.1f} s)",
         results["train_warm"]["seconds"], 30.0),
        ("worker private memory growth, GQA train epoch", "≤ 50 MB",
         f"{results['workers']['growth_mb']:.1f} MB over {results['workers']['records']:,} records",
         results["workers"]["growth_mb"], 50.0),
    ]  # fmt: skip
    markdown = report(
        f"Data path at scale {args.scale}",
        f"Official-format files at {args.scale} × the public data sets' sizes (generated in "
        f"{made:.0f} s), each figure in a fresh process on this machine ({os.cpu_count()} cores).",
        figures,
        f"Peak RSS of the warm launch.train run: {results['train_warm']['peak_rss_mb']:.0f} MB "
        f"(cold {results['train_cold']['peak_rss_mb']:.0f} MB). Records read: "
        + ", ".join(f"{k} {v:,}" for k, v in results["warm"]["records"].items()),
    )
    write("data_scale", results, markdown)
    print(markdown)
    return results


if __name__ == "__main__":
    main()
