"""The no-image baselines moved to :mod:`tasks.baselines` (``python -m tasks.baselines TASKS_YAML``):
each task owns its baseline, and a loop over the tasks' baselines belongs with the tasks."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print(
        "the no-image baselines moved to "
        "`python -m tasks.baselines TASKS_YAML [--tasks T …] [--split S]`",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
