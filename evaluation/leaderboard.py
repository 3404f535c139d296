"""One table over runs: ``python -m evaluation.leaderboard RUN_DIR… [--out FILE] [--split S]``.

Columns: run, method, backbone, trainable parameters, training time, each task's headline metric
(accuracy; CIDEr for captions; mean recall for retrieval) on the split, and their average over the
tasks all rows share (rows with different task sets are not ranked on different things). Written
as Markdown (``--out``, default ``leaderboard.md``) plus ``.csv``, ``.json`` and a ``.png`` bar chart
beside it; the Markdown is printed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from vlpeft.checkpoint import atomic_write, write_json


def load_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (is {run_dir} a finished run?)")
    return json.loads(path.read_text())


def rows(summaries: list[dict], split: str = "test") -> tuple[list[str], list[dict]]:
    """The task columns and one row per run (headline metrics of ``split``).

    ``average`` is over the tasks *every* row has, so rows are ranked on the same thing (a
    retrieval-only row and a four-task row share none: no average, "–")."""
    tasks = sorted(
        {k.split("/")[0] for s in summaries for k in s["results"] if k.endswith(f"/{split}")}
    )
    shared = [
        t for t in tasks if all(s["results"].get(f"{t}/{split}") is not None for s in summaries)
    ]
    table = []
    for s in summaries:
        scores = {t: s["results"].get(f"{t}/{split}") for t in tasks}
        common = [scores[t] for t in shared]
        table.append({
            "run": s["run"], "method": s["method"], "backbone": s.get("backbone") or f"{s['family']} ({s['preset']})",
            "trainable": s["trainable"], "train_s": s["train_seconds"], **scores,
            "average": sum(common) / len(common) if common else None,
        })  # fmt: skip
    return tasks, table


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_markdown(summaries: list[dict], split: str = "test") -> str:
    tasks, table = rows(summaries, split)
    columns = ["run", "method", "backbone", "trainable", "train_s", *tasks, "average"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in table]
    return "\n".join(lines) + "\n"


def plot(summaries: list[dict], path: Path, split: str = "test") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, table = rows(summaries, split)
    columns = [*tasks, "average"]
    fig, ax = plt.subplots(figsize=(1.2 + 1.3 * len(columns), 3.2))
    width = 0.8 / max(1, len(table))
    for i, row in enumerate(table):
        values = [row[c] or 0.0 for c in columns]
        ax.bar(
            [j + i * width for j in range(len(columns))],
            values,
            width,
            label=f"{row['run']}: {row['method']}",
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(columns))], columns)
    ax.set_ylabel(f"{split} headline metric")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def write_all(summaries: list[dict], out: Path, split: str = "test") -> str:
    markdown = render_markdown(summaries, split)
    atomic_write(out, lambda tmp: Path(tmp).write_text(markdown))
    tasks, table = rows(summaries, split)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    atomic_write(out.with_suffix(".csv"), lambda tmp: Path(tmp).write_text(text.getvalue()))
    write_json(out.with_suffix(".json"), {"split": split, "tasks": tasks, "rows": table})
    plot(summaries, out.with_suffix(".png"), split)
    return markdown


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="Leaderboard table over finished runs.")
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument(
        "--out", type=Path, default=Path("leaderboard.md"), help="Markdown output file"
    )
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    try:
        summaries = [load_summary(r) for r in args.runs]
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    markdown = write_all(summaries, args.out, args.split)
    print(markdown)
    return markdown


if __name__ == "__main__":
    main()
