"""Predict and score a finished run: ``python -m launch.evaluate RUN_DIR [--task T] [--split S]``.

Loads the run's model and adapters (:func:`launch.run.load_run`: it needs the run's training
config), then :func:`evaluation.evaluate.evaluate_task` for each task and split writes the
official submission file and the scores under ``RUN_DIR/eval/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evaluation.evaluate import evaluate_all
from launch.distributed import resolve_device
from launch.run import RunError, load_run
from tasks.base import DataError


def evaluate_run(
    run_dir: str | Path, tasks=None, split: str | None = None, device: str | None = None
) -> dict:
    """Scores records of the run's tasks (default: all) on ``split`` (default: its eval.splits),
    on ``device`` (default: the run's ``train.device``; ``auto`` picks a GPU when there is one)."""
    run_dir = Path(run_dir)
    model, router, config = load_run(run_dir)
    if device is not None:
        config.train.device = device
    model.to(resolve_device(config))
    splits = [split] if split else list(config.eval.splits)
    return evaluate_all(model, router, splits, run_dir / "eval", config.eval, tasks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Predict and score a run's tasks (official metrics)."
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--task", action="append", help="task name (repeatable; default: all of the run's)"
    )
    parser.add_argument("--split", default=None, help="split (default: the run's eval.splits)")
    parser.add_argument(
        "--device", default=None, help="auto, cpu, cuda, cuda:N (default: the run's)"
    )
    args = parser.parse_args(argv)
    try:
        records = evaluate_run(args.run_dir, args.task, args.split, args.device)
    except (RunError, DataError, FileNotFoundError, ValueError) as err:  # ConfigError too
        print(f"error: {err}", file=sys.stderr)
        return 1
    for record in records.values():
        print(json.dumps({k: record[k] for k in ("task", "split", "metric", "headline")}))
        if record.get("note"):
            print(record["note"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
