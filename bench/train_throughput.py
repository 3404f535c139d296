"""Does the data pipeline keep the device busy? ``python -m bench.train_throughput [--gpu-size]``.

Real-size JPEGs (the synthetic scenes written at 480 × 480, about COCO's size), resized to the
family's base image size (224 px for CLIP-BART) in the loader; the launcher's own training loop
with 0 and N data-loading workers, measured by its step clock (``perf/*`` in metrics.jsonl):
seconds per step, images per second and ``data_wait``, the fraction of step time spent waiting
for the next batch (target on a GPU: ≤ 0.05 with workers). On the CPU the model is tiny (the cores
both decode and train, so compute dominates); on a GPU CLIP-BART base (random weights, bf16).

Results: ``bench/results/train_throughput_<cpu|gpu>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from bench.common import machine, report, write
from launch.config import load_config
from launch.train import train
from tasks.synthetic import generate


def settings(device: str, workers: int, data: Path, steps: int, batch: int) -> dict:
    gpu = device.startswith("cuda")
    overrides = {"pretrained": False} if gpu else {"image_size": 224, "vision": {"image_size": 224}}
    return {
        "model": {"family": "clip-bart", "preset": "base" if gpu else "tiny", "overrides": overrides},
        "adapters": {"default": {"method": "lora", "r": 8, "routing": "proj"}},
        "data": {"file": str(data / "tasks.yaml"),
                 "tasks": {"vqa": {"batch_size": batch}, "caption": {"batch_size": batch}}},
        "train": {"steps": steps, "log_every": max(1, steps // 8), "checkpoint_every": 0,
                  "tensorboard": False, "num_workers": workers, "device": device,
                  "precision": "bf16" if gpu else "fp32"},
        "eval": {"splits": []},
    }  # fmt: skip


def measure(device: str, workers: int, data: Path, steps: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, data=settings(device, workers, data, steps, batch))
        train(config, Path(tmp) / "run")
        lines = [
            json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        ]
    perf = [x for x in lines if "perf/step_s" in x][
        1:
    ]  # the first interval warms up (workers start)
    return {
        "num_workers": workers,
        "device": device,
        "batch_size": batch,
        # medians over the logging intervals: robust to a noisy machine
        "step_s": statistics.median(x["perf/step_s"] for x in perf),
        "images_per_s": statistics.median(x["perf/examples_per_s"] for x in perf),
        "data_wait": statistics.median(x["perf/data_wait"] for x in perf),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30
        if device.startswith("cuda")
        else None,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=None, help="N (default 2 on CPU, 8 on GPU)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    workers = args.workers or (8 if gpu else 2)
    steps = args.steps or (120 if gpu else 24)
    batch = args.batch or (32 if gpu else 8)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generate(data, images=max(64, 2 * batch), seed=0, size=480)
        rows = [measure(args.device, n, data, steps, batch) for n in (0, workers)]
    kind = "gpu" if gpu else "cpu"
    target = 0.05
    base, piped = rows
    figures = [(
        f"data_wait with {piped['num_workers']} workers", "≤ 0.05 (on a GPU)",
        f"{piped['data_wait']:.3f} ({piped['step_s'] * 1000:.0f} ms/step, "
        f"{piped['images_per_s']:.0f} img/s)", piped["data_wait"], target,
    )]  # fmt: skip
    intro = (
        f"CLIP-BART {'base, bf16' if gpu else 'tiny at 224 px, fp32'}, VQA + captions, batch "
        f"{batch}, {steps} steps, 480 × 480 JPEGs decoded and resized in the loader; "
        f"{machine(args.device)}. Without workers: data_wait {base['data_wait']:.3f} "
        f"({base['step_s'] * 1000:.0f} ms/step, {base['images_per_s']:.0f} img/s)."
        + (
            ""
            if gpu
            else " On this CPU the workers share the cores that train, so the step "
            "may not get faster; the figure that matters is the GPU's."
        )
    )
    write(f"train_throughput_{kind}", {"settings": rows, "machine": machine(args.device)},
          report("Training throughput: data-loading workers", intro, figures))  # fmt: skip
    for row in rows:
        print(row)
    return rows


if __name__ == "__main__":
    main()
