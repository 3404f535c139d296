"""One table over runs: ``python -m evaluation.leaderboard RUN_DIR… [--out FILE] [--split S]``.

Columns: run, method, backbone, trainable parameters, training time, each task's headline metric
on the split, its header naming it (``vqa acc``, ``caption CIDEr``, ``retrieval recall``: the mean
recall), and their average over the tasks all rows share (rows with different task sets are not
ranked on different things). A run's scores are its ``run.json``'s, completed by its
``eval/<task>_<split>.json`` (``launch.evaluate`` writes them: ``--split val`` reads the validation
scores a run logged). The scores by a reference evaluator's rules (``vqa/test_vladapter``,
``reference`` of a score record) are carried in a run's results but get no column: the table
shows the official headlines. Rows of runs of the same name (a recipe's seeds) are named by the run
directory's parent too (``seed1/lora``). Written as Markdown (``--out``, default
``leaderboard.md``) plus ``.csv``, ``.json`` and a ``.png`` (one panel per kind of metric, value
labels, a missing score marked as missing) beside it; the Markdown is printed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from evaluation.scoring import reference_key
from vlpeft.checkpoint import atomic_write, write_json

# a task's metric (its ``metric``) as a header names it, and the PNG panel it is drawn in
METRIC_LABELS = {"accuracy": "acc", "CIDEr": "CIDEr", "r_mean": "recall"}
METRIC_KINDS = {"accuracy": "accuracy", "CIDEr": "CIDEr", "r_mean": "recall (mean R@1/5/10)"}


def load_summary(run_dir: Path) -> dict:
    """A run's ``run.json``, with the scores of its ``eval/<task>_<split>.json`` that run.json
    lacks (validation scores, a later ``launch.evaluate``) and each score's metric."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (is {run_dir} a finished run?)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # malformed, not UTF-8, nested too deeply
        raise FileNotFoundError(f"{path}: not a run summary ({type(err).__name__})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("results"), dict):
        raise FileNotFoundError(f"{path}: not a run summary (no 'results' mapping)")
    summary["run_dir"] = str(run_dir)
    add_eval_files(summary, Path(run_dir) / "eval")
    return summary


def add_eval_files(summary: dict, folder: Path) -> None:
    """Fills ``summary`` from the score records in ``folder`` (``<task>_<split>.json``): the
    scores of a split run.json holds none of (``val``: the validation a run logged), with what
    they were computed on; the metric of every score."""
    metrics = summary.setdefault("metrics", {})
    summarised = {key.rpartition("/")[2] for key in summary["results"]}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError, OSError):
            continue  # a prediction file or something else: not a score record
        if not isinstance(record, dict) or not {"task", "split", "metric"} <= set(record):
            continue
        key = f"{record['task']}/{record['split']}"
        if path.name != f"{record['task']}_{record['split']}.json":
            continue
        metrics.setdefault(key, record["metric"])
        if record["split"] not in summarised and record.get("headline") is not None:
            summary["results"][key] = record["headline"]
            reference = record.get("reference")
            for name, value in reference.items() if isinstance(reference, dict) else ():
                # run.json's key for it: <task>/<split>_<evaluator> (vqa/test_vladapter), which
                # no column of a split takes (columns() reads <task>/<split> only)
                summary["results"][reference_key(key, name)] = value
            if record.get("data") is not None:
                summary.setdefault("evaluations", {})[key] = record["data"]


def metric_of(summaries: list[dict], key: str) -> str | None:
    """The metric of the score ``key`` (``accuracy``, ``CIDEr``, ``r_mean``) as any run names it."""
    for s in summaries:
        metric = (s.get("metrics") or {}).get(key)
        if metric:
            return metric
    return None


def header(column: str, metric: str | None) -> str:
    """A column's header: the task, the metric, then what tells evaluations apart
    (``vqa acc (karpathy_test, 6)``)."""
    if metric is None:
        return column
    task, paren, rest = column.partition(" (")
    return f"{task} {METRIC_LABELS.get(metric, metric)}" + (f" ({rest}" if paren else "")


def row_names(summaries: list[dict]) -> list[str]:
    """Each row's name: the run's, and where several runs share it (seeds of one recipe), the
    run directory's parent too (``seed1/lora``); still equal ones are numbered."""
    runs = [s["run"] for s in summaries]
    names = list(runs)
    for i, s in enumerate(summaries):
        if runs.count(s["run"]) > 1 and s.get("run_dir"):
            names[i] = f"{Path(s['run_dir']).resolve().parent.name}/{s['run']}"
    shared = list(names)
    for i, name in enumerate(shared):
        if shared.count(name) > 1:
            names[i] = f"{name} #{shared[:i].count(name) + 1}"
    return names


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
    for s, run_name in zip(summaries, row_names(summaries)):
        scores = {name: score(s, key, e, only) for name, key, e, only in cols}
        table.append({
            "run": run_name, "method": s["method"], "backbone": s.get("backbone") or f"{s['family']} ({s['preset']})",
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


def headers(summaries: list[dict], split: str = "test") -> dict[str, str]:
    """Each score column's header (:func:`header`), by column."""
    return {
        name: header(name, metric_of(summaries, key)) for name, key, *_ in columns(summaries, split)
    }


def render_markdown(summaries: list[dict], split: str = "test") -> str:
    tasks, table = rows(summaries, split)
    named = headers(summaries, split)
    columns = ["run", "method", "backbone", "trainable", "train_s", *tasks, "average"]
    lines = [
        "| " + " | ".join(named.get(c, c) for c in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in table]
    return "\n".join(lines) + "\n"


def plot(summaries: list[dict], path: Path, split: str = "test") -> None:
    """One panel per kind of metric (accuracy, CIDEr, recall; the average apart), a bar per run
    and column with its value written on it; a missing score is marked "missing", never drawn
    as 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, table = rows(summaries, split)
    named = headers(summaries, split)
    metric = {name: metric_of(summaries, key) for name, key, *_ in columns(summaries, split)}
    panels: dict[str, list[str]] = {}
    for name in tasks:
        kind = METRIC_KINDS.get(metric[name], metric[name] or "score")
        panels.setdefault(kind, []).append(name)
    panels["average (columns every row has)"] = ["average"]
    sizes = [len(c) for c in panels.values()]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(2.0 + 1.6 * sum(sizes) * max(1, len(table)) ** 0.5, 3.6),
        gridspec_kw={"width_ratios": sizes}, squeeze=False,
    )  # fmt: skip
    width = 0.8 / max(1, len(table))
    for ax, (kind, cols) in zip(axes[0], panels.items()):
        top = max([r[c] for r in table for c in cols if r[c] is not None] or [1.0])
        for i, row in enumerate(table):
            xs = [j + i * width for j in range(len(cols))]
            values = [row[c] for c in cols]
            bars = ax.bar(
                xs, [v if v is not None else 0.0 for v in values], width,
                label=f"{row['run']}: {row['method']}", color=f"C{i}",
            )  # fmt: skip
            labels = [f"{v:.1f}" if v is not None else "" for v in values]
            ax.bar_label(bars, labels=labels, fontsize=6, padding=1)
            for x, v in zip(xs, values):
                if v is None:  # no bar: the score is missing, not 0
                    ax.text(x, top * 0.02, "missing", rotation=90, ha="center", va="bottom",
                            fontsize=6, color="grey")  # fmt: skip
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))],
                      [named.get(c, c) for c in cols], fontsize=7)  # fmt: skip
        ax.set_ylim(0, top * 1.15)
        ax.set_title(f"{split}: {kind}", fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def write_all(summaries: list[dict], out: Path, split: str = "test") -> str:
    markdown = render_markdown(summaries, split)
    atomic_write(out, lambda tmp: Path(tmp).write_text(markdown))
    tasks, table = rows(summaries, split)
    named = headers(summaries, split)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow([named.get(c, c) for c in table[0]])
    writer.writerows([list(row.values()) for row in table])
    atomic_write(out.with_suffix(".csv"), lambda tmp: Path(tmp).write_text(text.getvalue()))
    write_json(
        out.with_suffix(".json"),
        {"split": split, "tasks": tasks, "headers": named, "rows": table},
    )
    plot(summaries, out.with_suffix(".png"), split)
    return markdown


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.leaderboard", description="Leaderboard table over finished runs."
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument(
        "--out", type=Path, default=Path("leaderboard.md"), help="Markdown output file"
    )
    parser.add_argument(
        "--split", default="test", help="test (default) or val: the runs' eval/*_val.json too"
    )
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
