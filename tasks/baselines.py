"""Baselines that never look at an image, scored like a model: the floor a leaderboard row must clear.

    python -m tasks.baselines TASKS_YAML [--tasks T …] [--split test]

Each task owns its baseline (``Task.baseline``): VQA and GQA give every question the most frequent
training answer, NLVR² the more frequent training label, captioning the most frequent training
caption, retrieval the exact expected recall of a uniformly random ranking. The predictions go
through the task's own official-metric scoring on the same records. :func:`baseline_summary`
returns a summary shaped like a run's ``run.json``, so :mod:`evaluation.leaderboard` renders it as
one more row. (It was ``evaluation.baselines``: a loop over the tasks' own baselines belongs with
the tasks, and evaluation need not import the router.)
"""

from __future__ import annotations

import argparse
import sys

from .base import DataError
from .provenance import evaluated_data
from .router import TaskRouter

__all__ = ["baseline_scores", "baseline_summary"]


def baseline_scores(
    router: TaskRouter, name: str, split: str = "test", limit: int | None = None
) -> tuple[str, dict, float]:
    """(what the baseline does, all scores, headline) for task ``name`` on ``split`` (its first
    ``limit`` records)."""
    return router[name].baseline(split, limit)


def baseline_summary(
    router: TaskRouter, tasks: list[str], split: str = "test", max_records: int | None = None
) -> dict:
    """A ``run.json``-shaped summary whose results are the baselines of ``tasks``, scored on the
    records a run with ``eval.max_records: max_records`` scores (and recording them, so the
    leaderboard puts it beside the runs of the same evaluation only)."""
    results, notes, evaluations = {}, {}, {}
    for name in tasks:
        note, _, headline = baseline_scores(router, name, split, max_records)
        results[f"{name}/{split}"] = headline
        notes[name] = note
        records = router[name].read(split, max_records)
        evaluations[f"{name}/{split}"] = evaluated_data(router[name], split, records, max_records)
    return {
        "run": "baseline",
        "method": "no image",
        "baselines": notes,
        "backbone": "none",
        "trainable": 0,
        "train_seconds": 0.0,
        "results": results,
        "metrics": {f"{name}/{split}": router[name].metric for name in tasks},
        "evaluations": evaluations,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tasks_yaml", help="a task-router YAML (tasks.synthetic writes one)")
    parser.add_argument("--tasks", nargs="*", help="task names (default: all in the file)")
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    try:
        router = TaskRouter.from_yaml(args.tasks_yaml, only=args.tasks or None)
        results = {name: baseline_scores(router, name, args.split) for name in router.tasks}
    except DataError as err:
        sys.exit(f"error: {err}")
    summary = {}
    for name, (note, scores, headline) in results.items():
        summary[name] = {"baseline": note, "headline": headline, "scores": scores}
        shown = "no annotations" if headline is None else f"{headline:.2f}"
        print(f"{name}/{args.split}: {shown} ({note})")
    return summary


if __name__ == "__main__":
    main()
