"""Shared benchmark plumbing: the machine, paired ratios after warm-up, results as JSON + Markdown."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine(device: str) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def verdict(value: float, target: float) -> str:
    return "met" if value <= target else "MISSED"


def report(title: str, intro: str, figures: list[tuple], after: str = "") -> str:
    """Markdown: the title, an intro paragraph and a table of figures against their targets.

    ``figures``: (figure, target as written, measured as written, value, limit) rows; the verdict
    is ``met`` when value ≤ limit.
    """
    lines = [
        f"# {title}",
        "",
        intro,
        "",
        "| figure | target | measured | verdict |",
        "|---|---|---|---|",
    ]
    lines += [f"| {f} | {t} | {m} | {verdict(v, lim)} |" for f, t, m, v, lim in figures]
    return "\n".join([*lines, "", *([after, ""] if after else [])])


def write(name: str, data: dict, markdown: str) -> Path:
    """bench/results/<name>.json and .md (a device suffix keeps CPU and GPU figures apart)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)
    return RESULTS / f"{name}.md"


def paired(fn: Callable[[], object], anchor: Callable[[], object], device: str, repeats: int,
           warmup: int) -> tuple[float, float, float]:  # fmt: skip
    """(median ratio fn/anchor, median fn seconds, median anchor seconds), timing the two in
    alternation so that drift of a noisy machine hits both alike."""
    for _ in range(warmup):
        fn()
        anchor()
    ratios, a_times, b_times = [], [], []
    for _ in range(repeats):
        pair = []
        for f in (fn, anchor):
            sync(device)
            start = time.perf_counter()
            f()
            sync(device)
            pair.append(time.perf_counter() - start)
        a_times.append(pair[0])
        b_times.append(pair[1])
        ratios.append(pair[0] / pair[1])
    return statistics.median(ratios), statistics.median(a_times), statistics.median(b_times)
