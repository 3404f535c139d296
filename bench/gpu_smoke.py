"""The GPU end-to-end check: ``python -m bench.gpu_smoke`` (one call, under 8 minutes on one GPU).

Base-size CLIP-BART (VQA, GQA, NLVR², captions when Java is there) and BLIP (retrieval), random
weights (``pretrained: false``; the shipped tiny tokenizer's ids, so nothing is downloaded),
synthetic data written as real-size JPEGs, a multitask run of a few hundred steps through the
launcher with data-loading workers and bf16, then its evaluation. Prints and writes
(``bench/results/gpu_smoke.{json,md}``) per model: seconds per step, images per second, the share
of step time spent waiting for data, peak GPU memory, and the evaluation's wall time and scores
(random weights: the scores only show the path works). How to run it on the lent GPU machine,
whose Python lacks part of our stack: DEVELOPERS.md.

``--tiny`` runs the same path with tiny models on the CPU in seconds (the test suite does).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine, write
from launch.config import load_config
from launch.train import train
from tasks.synthetic import generate
from vlpeft.models.tokenizer import load_tokenizer


def tiny_ids() -> tuple[dict, dict]:
    """The tiny tokenizer's special ids for BART's and BLIP's text configs (base sizes keep
    their vocabulary size: the tiny ids are all below it)."""
    bart_tok, bert_tok = load_tokenizer("tiny"), load_tokenizer("tiny")
    bart = {"pad_token_id": bart_tok.pad_token_id, "bos_token_id": bart_tok.bos_token_id,
            "eos_token_id": bart_tok.eos_token_id, "decoder_start_token_id": bart_tok.eos_token_id,
            "forced_eos_token_id": None}  # fmt: skip
    blip = {"pad_token_id": bert_tok.pad_token_id, "bos_token_id": bert_tok.convert_tokens_to_ids("[DEC]"),
            "sep_token_id": bert_tok.sep_token_id, "eos_token_id": bert_tok.sep_token_id}  # fmt: skip
    return bart, blip


def runs(data: Path, tiny: bool, steps: int, workers: int, java: bool) -> dict[str, dict]:
    bart_ids, blip_ids = tiny_ids()
    preset = "tiny" if tiny else "base"
    device = "cpu" if tiny else "cuda"
    train_section = {"steps": steps, "log_every": max(1, steps // 10), "checkpoint_every": 0,
                     "tensorboard": False, "num_workers": workers, "device": device,
                     "precision": "bf16", "lr": 1e-4}  # fmt: skip
    size = {"image_size": 64, "vision": {"image_size": 64}} if tiny else {}
    batch = 4 if tiny else 32
    clip_tasks = {t: {"batch_size": batch} for t in ("vqa", "gqa", "nlvr2")}
    if java:
        clip_tasks["caption"] = {"batch_size": batch}
    blip_size = {"blip": {"vision_config": {"image_size": 64}}} if tiny else {}
    return {
        "clip-bart": {
            "model": {"family": "clip-bart", "preset": preset,
                      "overrides": {"pretrained": False, "tokenizer": "tiny", "text": bart_ids, **size}},
            "adapters": {"default": {"method": "lora", "r": 96 if not tiny else 4, "routing": "proj"}},
            "data": {"file": str(data / "tasks.yaml"), "tasks": clip_tasks},
            "train": train_section,
            "eval": {"splits": ["test"], "max_records": 256, "max_new_tokens": 10},
        },
        "blip": {
            "model": {"family": "blip", "preset": preset,
                      "overrides": {"pretrained": False, "tokenizer": "tiny", "heads": ["retrieval"],
                                    "blip": {"text_config": blip_ids, **blip_size.get("blip", {})}}},
            "adapters": {"default": {"method": "lora", "r": 32 if not tiny else 4}},
            "data": {"file": str(data / "tasks.yaml"), "tasks": {"retrieval": {"batch_size": batch}}},
            "train": {**train_section, "steps": max(2, steps // 2)},
            "eval": {"splits": ["test"], "max_records": 256, "itm_k": 16},
        },
    }  # fmt: skip


def measure(name: str, spec: dict, out: Path, device: str) -> dict:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    summary = train(load_config(None, data=spec), out / name)
    total = time.perf_counter() - started
    lines = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    perf = [x for x in lines if "perf/step_s" in x][1:] or [x for x in lines if "perf/step_s" in x]
    median = lambda key: sorted(x[key] for x in perf)[len(perf) // 2]  # noqa: E731
    return {
        "model": name,
        "steps": summary["steps"],
        "step_s": median("perf/step_s"),
        "images_per_s": median("perf/examples_per_s"),
        "data_wait": median("perf/data_wait"),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "train_s": summary["train_seconds"],
        "train_and_eval_s": round(total, 1),
        "results": summary["results"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a check)")
    parser.add_argument("--steps", type=int, default=None, help="CLIP-BART steps (BLIP: half)")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.gpu_smoke needs a GPU (--tiny checks the path on the CPU)")
    steps = args.steps or (4 if args.tiny else 300)
    workers = args.workers if args.workers is not None else (0 if args.tiny else 8)
    # caption scoring needs pycocoevalcap and Java (its PTB tokenizer); the GPU machine has neither
    java = (
        shutil.which("java") is not None and importlib.util.find_spec("pycocoevalcap") is not None
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generate(data, images=48 if args.tiny else 512, seed=0, size=64 if args.tiny else 480)
        rows = [measure(name, spec, Path(tmp), device)
                for name, spec in runs(data, args.tiny, steps, workers, java).items()]  # fmt: skip
    lines = ["# GPU end-to-end check (bench.gpu_smoke)", "",
             f"{machine(device)}; {workers} workers, bf16, random weights, 480 × 480 JPEGs; "
             f"whole check {time.perf_counter() - started:.0f} s."
             + ("" if java else " No Java/pycocoevalcap: captions not trained or scored."), "",
             "| model | steps | s/step | images/s | data wait | peak GB | train s | train+eval s |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        peak = "–" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"
        lines.append(f"| {r['model']} | {r['steps']} | {r['step_s']:.3f} | {r['images_per_s']:.0f} | "
                     f"{r['data_wait']:.3f} | {peak} | {r['train_s']} | {r['train_and_eval_s']} |")  # fmt: skip
    if not args.tiny:
        write("gpu_smoke", {"machine": machine(device), "runs": rows}, "\n".join(lines) + "\n")
    else:
        print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
