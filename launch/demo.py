"""The demo (``make demo``): two tiny vision-language models fine-tuned with PEFT, on one leaderboard.

    python -m launch.demo [--out .demo] [--images 300] [--quick]

1. writes the synthetic data set in the official formats (:mod:`tasks.synthetic`) to OUT/data;
2. warm-starts the tiny BART by denoising the training text (:mod:`launch.pretrain_text`), the
   stand-in for the pretrained BART a real run loads; frozen from then on;
3. trains a tiny CLIP-BART with one routed LoRA on VQA, GQA, NLVR² and captioning at once
   (``launch/configs/demo_clip_bart.yaml``) and evaluates it on the test splits;
4. trains a tiny BLIP with Null-LoRA regularised by ReSoRA on image-text retrieval
   (``launch/configs/demo_blip.yaml``) and evaluates it;
5. prints the leaderboard: both runs and the no-image baselines (majority answer, most common
   caption, random ranking; :mod:`tasks.baselines`) scored with the same metrics, and writes
   it to OUT/leaderboard.{md,csv,json,png}.

The data and the warm-started text model are reused when present (same settings); the runs are
trained afresh each time. ``--quick`` shrinks everything to seconds (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from evaluation.leaderboard import write_all  # noqa: E402
from launch.config import load_config  # noqa: E402
from launch.pretrain_text import pretrain  # noqa: E402
from launch.train import train  # noqa: E402
from tasks import synthetic  # noqa: E402
from tasks.baselines import baseline_summary  # noqa: E402
from tasks.router import TaskRouter  # noqa: E402

CONFIGS = Path(__file__).parent / "configs"
RUNS = {"clip_bart": CONFIGS / "demo_clip_bart.yaml", "blip": CONFIGS / "demo_blip.yaml"}
WARM_START = {"steps": 400, "batch_size": 64, "lr": 1e-3, "mask": 0.3}
QUICK = {  # seconds instead of minutes: the wiring, not the scores
    "images": 40,
    "warm_start": {"steps": 3, "batch_size": 8},
    "overrides": ["train.steps=4", "train.checkpoint_every=2", "eval.max_records=8"],
}


def stage(message: str) -> None:
    print(f"\n== {message}", flush=True)


def synthetic_data(out: Path, images: int, seed: int = 0) -> Path:
    """OUT/data/tasks.yaml, written unless a data set of the same settings is there."""
    stamp = out / "settings.json"
    settings = {"images": images, "seed": seed}
    if (out / "tasks.yaml").is_file() and stamp.is_file():
        if json.loads(stamp.read_text()) == settings:
            print(f"reusing {out} ({images} images)")
            return out / "tasks.yaml"
    shutil.rmtree(out, ignore_errors=True)
    counts = synthetic.generate(out, images, seed)
    stamp.write_text(json.dumps(settings))
    print(f"wrote {out}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return out / "tasks.yaml"


def warm_start(config_path: Path, overrides: list[str], out: Path, settings: dict) -> None:
    """OUT (a transformers BART directory), trained unless one made from the same settings, model
    section and data is there."""
    config = load_config(config_path, overrides)
    data = Path(config.data.file).parent / "settings.json"
    made_from = {
        "warm_start": settings,
        "model": {k: v for k, v in config.model.overrides.items() if k != "weights"},
        "data": json.loads(data.read_text()) if data.is_file() else None,
    }
    stamp = out / "demo-settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == made_from:
        done = json.loads((out / "pretrain.json").read_text())
        print(f"reusing {out} (loss {done['loss_first']:.2f} -> {done['loss_last']:.2f})")
        return
    result = pretrain(config, out, **settings)
    stamp.write_text(json.dumps(made_from))
    print(
        f"wrote {out}: denoising loss {result['loss_first']:.2f} -> {result['loss_last']:.2f} "
        f"in {result['seconds']:.0f} s"
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".demo"), help="output folder")
    parser.add_argument("--images", type=int, default=300, help="synthetic scenes")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    begin = time.perf_counter()
    images = QUICK["images"] if args.quick else args.images
    extra = QUICK["overrides"] if args.quick else []
    settings = {**WARM_START, **(QUICK["warm_start"] if args.quick else {})}

    stage("1/5 synthetic data (official formats)")
    tasks_yaml = synthetic_data(args.out / "data", images)
    text_model = args.out / "backbones" / "clip-bart-text"
    common = [f"data.file={tasks_yaml}"]
    clip_bart = [*common, f"model.overrides.weights.text={text_model}", *extra]

    stage("2/5 denoising warm start of the tiny BART (stands in for pretrained weights)")
    warm_start(RUNS["clip_bart"], clip_bart, text_model, settings)

    summaries, tasks, limits = {}, [], set()
    for number, (name, overrides) in enumerate(
        (("clip_bart", clip_bart), ("blip", [*common, *extra])), 3
    ):
        config = load_config(RUNS[name], overrides)
        stage(f"{number}/5 {name}: {', '.join(config.data.tasks)} ({RUNS[name].name})")
        run_dir = args.out / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        tasks += list(config.data.tasks)
        limits.add(config.eval.max_records)
        summaries[name] = train(config, run_dir)

    stage("5/5 leaderboard (test splits; baseline = no image, same metrics)")
    router = TaskRouter.from_yaml(tasks_yaml, only=tasks)
    (limit,) = limits  # both runs score the same records: the baseline scores them too
    baseline = baseline_summary(router, tasks, max_records=limit)
    markdown = write_all([baseline, *summaries.values()], args.out / "leaderboard.md")
    print(markdown)
    print("baseline: " + "; ".join(f"{k} {v}" for k, v in baseline["baselines"].items()))
    print(f"written to {args.out / 'leaderboard.md'} (+ .csv .json .png); "
          f"total {time.perf_counter() - begin:.0f} s")  # fmt: skip
    return markdown


if __name__ == "__main__":
    main()
