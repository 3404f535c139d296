"""Every problem of a data set at once, before a run: ``python -m tasks.check DATA_YAML``.

For each task of a task-router YAML (``tasks.synthetic`` writes one) and each of its configured
splits, the split is read through the task's own reader (missing files, malformed JSON, missing or
mistyped fields, duplicate ids, empty splits) and every image it names is decoded completely
(missing, unreadable or truncated images — ``Image.verify`` alone passes JPEGs cut short). A
training run stops at the first problem; this lists them all, with the file, the record and the
field, and exits 1 when there is any.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from .base import DataError, Task, file_problem, readable
from .router import TaskRouter


def check_task(name: str, task: Task, splits: list[str] | None = None) -> list[str]:
    """The problems of ``task``'s splits: reader errors, then every image that does not decode."""
    problems = []
    for split in splits or list(task.config.splits):
        try:
            records = task.read_split(task.split_name(split))
        except DataError as err:
            problems.append(f"{name}/{split}: {err}")
            continue
        if not records:
            problems.append(f"{name}/{split}: the split is empty")
        paths = {str(p): r for r in records for p in r["images"]}
        for path, record in tqdm(paths.items(), desc=f"check {name}/{split}", leave=False):
            problem = file_problem(path)
            if problem is not None:
                problems.append(
                    f"{record['source']}: record {record['id']!r}: image {path} {problem}"
                )
            elif not readable(path):
                problems.append(
                    f"{record['source']}: record {record['id']!r}: image {path} does not decode "
                    "(unreadable or truncated)"
                )
    return problems


def check(tasks_yaml: str | Path, only: list[str] | None = None) -> list[str]:
    """Every problem of the data set a task-router YAML describes (an empty list: none)."""
    router = TaskRouter.from_yaml(tasks_yaml, only=only)
    return [p for name, task in router.tasks.items() for p in check_task(name, task)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tasks_yaml", help="a task-router YAML")
    parser.add_argument("--tasks", nargs="*", help="task names (default: all in the file)")
    args = parser.parse_args(argv)
    try:
        problems = check(args.tasks_yaml, args.tasks or None)
    except DataError as err:  # the YAML itself
        print(f"error: {err}", file=sys.stderr)
        return 1
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s)" if problems else "no problems found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
