"""Predict and score a finished run: ``python -m launch.evaluate RUN_DIR [--task T] [--split S]
[--mixed] [--max-records N|all]``.

Loads the run's model and adapters (:func:`launch.run.load_run`: it needs the run's training
config), then :func:`evaluation.evaluate.evaluate_task` for each task and split writes the
official submission file and the scores under ``RUN_DIR/eval/``. ``--mixed`` evaluates the tasks
in one pass of batches that mix their records, each row through its task's adapter set
(:func:`evaluation.evaluate.evaluate_mixed`; the same scores). ``--max-records`` replaces the
run's ``eval.max_records`` (``all``: every record, the tasks' own ``max_records`` too); a split
without answers is always predicted whole.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evaluation.evaluate import evaluate_all, evaluate_mixed
from launch.distributed import resolve_device
from launch.run import RunError, load_run
from tasks.base import DataError


def evaluate_run(
    run_dir: str | Path,
    tasks=None,
    split: str | None = None,
    device: str | None = None,
    mixed: bool = False,
    max_records: int | str | None = None,
) -> dict:
    """Scores records of the run's tasks (default: all) on ``split`` (default: its eval.splits),
    on ``device`` (default: the run's ``train.device``; ``auto`` picks a GPU when there is one);
    ``mixed``: all tasks in one pass of mixed-task batches; ``max_records``: N, or ``"all"``
    (None: the run's ``eval.max_records``)."""
    run_dir = Path(run_dir)
    model, router, config = load_run(run_dir)
    if device is not None:
        config.train.device = device
    if max_records == "all":
        config.eval.max_records = None
        for task in router.tasks.values():
            task.config.max_records = None
    elif max_records is not None:
        config.eval.max_records = max_records
    model.to(resolve_device(config))
    splits = [split] if split else list(config.eval.splits)
    if not mixed:
        return evaluate_all(model, router, splits, run_dir / "eval", config.eval, tasks)
    results = {}
    for each in splits:
        results.update(evaluate_mixed(model, router, each, run_dir / "eval", config.eval, tasks))
    return results


def max_records_arg(value: str) -> int | str:
    """``--max-records``: a count >= 1 or ``all``."""
    if value == "all":
        return value
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or 'all', got {value!r}")
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.evaluate",
        description="Predict and score a run's tasks (official metrics).",
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--task", action="append", help="task name (repeatable; default: all of the run's)"
    )
    parser.add_argument("--split", default=None, help="split (default: the run's eval.splits)")
    parser.add_argument(
        "--device", default=None, help="auto, cpu, cuda, cuda:N (default: the run's)"
    )
    parser.add_argument(
        "--mixed",
        action="store_true",
        help="all tasks in one pass: batches mix their records, each row with its task's adapters",
    )
    parser.add_argument(
        "--max-records",
        type=max_records_arg,
        default=None,
        metavar="N|all",
        help="records per annotated split (default: the run's eval.max_records; all: every one; "
        "a split without answers is always predicted whole)",
    )
    args = parser.parse_args(argv)
    try:
        records = evaluate_run(
            args.run_dir, args.task, args.split, args.device, args.mixed, args.max_records
        )
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
