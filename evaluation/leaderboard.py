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
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # malformed, not UTF-8, nested too deeply
        raise FileNotFoundError(f"{path}: not a run summary ({type(err).__name__})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("results"), dict):
        raise FileNotFoundError(f"{path}: not a run summary (no 'results' mapping)")
    return summary


def evaluation_of(summary: dict, key: str) -> tuple | None:
    """What a run's score ``key`` was computed on, as a comparable value: the data set's split,
    the record count and ids, and the annotation files by name, size and content hash (not by
    folder or mtime: moved or copied data is the same evaluation). None: not recorded (a run
    from before run.json kept it)."""
    data = (summary.get("evaluations") or {}).get(key)
    if data is None:
        return None
    files = sorted(
        (Path(path).name, f["bytes"], f["head_tail_sha256"]) for path, f in data["files"].items()
    )
    return data["split_name"], data["records"], data["ids_sha256"], tuple(files)


def columns(summaries: list[dict], split: str) -> list[tuple[str, str, tuple | None, bool]]:
    """(column name, result key, evaluation, whether the column is the key's only one). A task
    whose runs were scored on different data (another split, a subset, other files) gets one
    column per evaluation, named by the split and the record count, so no two numbers of
    different evaluations share a column or an average."""
    keys = sorted({k for s in summaries for k in s["results"] if k.endswith(f"/{split}")})
    found = []
    for key in keys:
        task = key.split("/")[0]
        scored = [s for s in summaries if s["results"].get(key) is not None]
        seen = list(dict.fromkeys(evaluation_of(s, key) for s in scored))
        if len(seen) <= 1:
            found.append((task, key, None, True))
            continue
        names = {e: f"{task} ({e[0]}, {e[1]})" if e else f"{task} (unrecorded)" for e in seen}
        for e in seen:
            clash = sum(name == names[e] for name in names.values()) > 1
            found.append((names[e][:-1] + f", {e[2][:6]})" if clash else names[e], key, e, False))
    return found


def rows(summaries: list[dict], split: str = "test") -> tuple[list[str], list[dict]]:
    """The task columns and one row per run (headline metrics of ``split``).

    ``average`` is over the columns *every* row has, so rows are ranked on the same thing (a
    retrieval-only row and a four-task row share none: no average, "–"); scores of different
    evaluations of one task are separate columns (:func:`columns`)."""
    cols = columns(summaries, split)

    def score(s: dict, key: str, evaluation, only: bool):
        value = s["results"].get(key)
        return value if only or evaluation_of(s, key) == evaluation else None

    table = []
    for s in summaries:
        scores = {name: score(s, key, e, only) for name, key, e, only in cols}
        table.append({
            "run": s["run"], "method": s["method"], "backbone": s.get("backbone") or f"{s['family']} ({s['preset']})",
            "trainable": s["trainable"], "train_s": s["train_seconds"], **scores,
        })  # fmt: skip
    names = [name for name, *_ in cols]
    shared = [n for n in names if all(row[n] is not None for row in table)]
    for row in table:
        common = [row[n] for n in shared]
        row["average"] = sum(common) / len(common) if common else None
    return names, table


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
