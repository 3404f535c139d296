"""Every problem of a data set at once, before a run: ``python -m tasks.check DATA_YAML [--root DIR]``.

For each task of a task-router YAML (``tasks.synthetic`` writes one) and each of its configured
splits, the split is read through the task's own reader (missing files, malformed JSON, missing or
mistyped fields, duplicate ids, empty splits) and every image it names is decoded completely
(missing, unreadable or truncated images — ``Image.verify`` alone passes JPEGs cut short). A
training run stops at the first problem; this lists them all, with the file, the record and the
field, and exits 1 when there is any. ``--root DIR`` (or ``data.root=DIR``, as training spells it)
is the folder the YAML's relative paths resolve against (default: the YAML's folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from .base import DataError, Task, file_problem, readable
from .router import CACHE_FOLDER, TaskRouter, load_yaml


def check_task(name: str, task: Task, splits: list[str] | None = None) -> list[str]:
    """The problems of ``task``'s splits: reader errors, then every image that does not decode."""
    problems = []
    for split in splits or list(task.config.splits):
        try:
            # parsed anew, not from the record cache; a split a+b is its parts' records
            parts = task.split_name(split).split("+")
            records = [record for part in parts for record in task.read_split(part)]
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


def check(
    tasks_yaml: str | Path, only: list[str] | None = None, root: str | Path | None = None
) -> list[str]:
    """Every problem of the data set a task-router YAML describes (an empty list: none); its
    relative paths resolve against ``root`` when given, else the YAML's folder."""
    tasks_yaml = Path(tasks_yaml)
    if root is None:
        router = TaskRouter.from_yaml(tasks_yaml, only=only)
    else:
        if not Path(root).is_dir():
            raise DataError(f"--root {root}: no such folder")
        router = TaskRouter.from_dict(
            load_yaml(tasks_yaml), Path(root), only, where=str(tasks_yaml),
            cache_dir=tasks_yaml.parent / CACHE_FOLDER,
        )  # fmt: skip
    return [p for name, task in router.tasks.items() for p in check_task(name, task)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("tasks_yaml", help="a task-router YAML")
    parser.add_argument("--tasks", nargs="*", help="task names (default: all in the file)")
    parser.add_argument(
        "--root", default=None, metavar="DIR",
        help="the data root the YAML's relative paths resolve against (default: its folder)",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="data.root=DIR", help="as --root")
    args = parser.parse_intermixed_args(argv)
    tasks = [t for t in args.tasks or [] if "=" not in t]  # --tasks a b data.root=… : not a task
    root = args.root
    for override in [*args.overrides, *(t for t in args.tasks or [] if "=" in t)]:
        key, _, value = override.partition("=")
        if key != "data.root" or not value:
            parser.error(f"{override!r}: the only override here is data.root=DIR")
        root = value
    try:
        problems = check(args.tasks_yaml, tasks or None, root)
    except DataError as err:  # the YAML itself
        print(f"error: {err}", file=sys.stderr)
        return 1
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s)" if problems else "no problems found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
