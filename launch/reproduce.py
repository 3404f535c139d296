"""The papers' recipes: ``python -m launch.reproduce RECIPE [--seeds N] [key=value …]``.

A recipe (``launch/configs/recipes/*.yaml``) is a training config with a ``paper:`` section (source,
table, split, ``results: {"<task>/<split>": number}``) and possibly ``stages`` (run in order; a
later stage's ``train.init_from: stage:<name>`` starts from that stage's run of the same seed).
This command trains every stage for each seed (seed k adds k to ``train.seed`` and
``sampler.seed``), evaluates, and prints our numbers beside the paper's: mean ± std over the seeds
and the difference. A finished stage (its ``run.json``) is reused and an interrupted one resumed,
so running the command again continues a reproduction.

Ours is scored the way the paper scored (``paper.evaluator``: for ``vladapter`` the runs'
``"<task>/<split>_vladapter"`` results where they have one; the table's "scored by" says which,
and "official" keeps the official headline). A recipe with ``paper.stand_in`` stands in for an
experiment it cannot run exactly: its rows are marked with that text (``launch.recipes`` reads
and checks the ``paper:`` keys).

    python -m launch.reproduce --list [--params]             # every recipe and its paper numbers
    python -m launch.reproduce R data.root=/datasets --check-data   # which files/weights are missing
    python -m launch.reproduce R data.root=/datasets --seeds 3      # run, then compare

Under several processes start it like training (``torchrun --nproc_per_node 8 -m
launch.reproduce …``, or ``deepspeed --num_gpus 8 -m launch.reproduce …`` with
``deepspeed.enabled=true``); rank 0 prints and writes ``reproduce.{json,md}``.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
from pathlib import Path

from evaluation.scoring import reference_key
from launch.config import STAGE_PREFIX, ConfigError, load_config, read_json
from launch.distributed import distributed_env
from launch.recipes import (
    EVALUATORS,
    check_weights,
    find_recipe,
    list_recipes,
    params_table,
    recipe_stages,
    stage_configs,
)  # fmt: skip
from launch.resume import EXECUTION_KEYS, config_changes
from launch.run import RunError, build_router, evaluated_splits
from launch.train import train
from tasks.base import DataError
from vlpeft.checkpoint import atomic_write, write_json

log = logging.getLogger("vlpeft.reproduce")
# a finished run's results answer its evaluation settings too: only validation may differ
REUSE_FREE = (*(k for k in EXECUTION_KEYS if k != "eval."), "eval.val_every")


def reuse_free(config) -> tuple[str, ...]:
    """The keys a finished run may differ in and still be reused for ``config``: how it
    executed, and its validation — unless validation chose the weights (``eval.select: best``)."""
    if config.eval.select == "last":
        return REUSE_FREE
    return tuple(k for k in REUSE_FREE if k != "eval.val_every")


REUSE_HINT = (
    "its results belong to that config: pass another --out, or remove the run to retrain it"
)


def check_data(path: Path, overrides=()) -> list[tuple[str, str, str]]:
    """(what, stage, ``ok (…)`` or the problem) for every split the recipe trains and evaluates
    and every weight source its stages' models load (nothing is downloaded)."""
    rows, seen = [], set()
    for name, config in stage_configs(path, overrides):
        try:
            router = build_router(config)
        except (ConfigError, DataError) as err:
            rows.append(("data.file", name or "", str(err)))
        else:
            for task in router.tasks:
                for split in dict.fromkeys(["train", *evaluated_splits(config)]):
                    key = (task, split, router[task].config.root)
                    if key in seen:
                        continue
                    seen.add(key)
                    try:
                        count = len(router[task].read(split))
                        rows.append((f"{task}/{split}", name or "", f"ok ({count} records)"))
                    except DataError as err:
                        rows.append((f"{task}/{split}", name or "", f"missing: {err}"))
        for what, status in check_weights(config):
            if (what, status) not in seen:  # the same source of every stage: said once
                seen.add((what, status))
                rows.append((what, name or "", status))
    return rows


def seed_overrides(config, seed: int) -> list[str]:
    """Seed ``seed`` (0: the recipe's own) of a multi-seed reproduction."""
    return [f"train.seed={config.train.seed + seed}", f"sampler.seed={config.sampler.seed + seed}"]


def run_recipe(path: Path, seeds: int, out: Path, overrides=()) -> dict:
    """Trains and evaluates every stage for each seed; returns the comparison per stage."""
    recipe = recipe_stages([path], overrides)  # the paper sections are checked before training
    papers = {stage or "run": paper for _, _, stage, _, paper in recipe}
    stages = [(stage, config) for _, _, stage, config, _ in recipe]
    results: dict[str, list[dict]] = {name or "run": [] for name, _ in stages}
    for seed in range(seeds):
        done: dict[str, Path] = {}
        for name, base in stages:
            label = name or "run"
            run_dir = out / f"seed{seed}" / label
            extra = list(overrides) + seed_overrides(base, seed)
            source = base.train.init_from or ""
            if source.startswith(STAGE_PREFIX):
                extra.append(f"train.init_from={done[source[len(STAGE_PREFIX) :]]}")
            config = load_config(path, extra, stage=name)
            summary_file = run_dir / "run.json"
            if summary_file.is_file():  # only a run of this very config counts
                config.data.file = str(Path(config.data.file).resolve())  # as the run wrote it
                config_changes(run_dir, config, doing="reusing a finished run",
                               hint=REUSE_HINT, free=reuse_free(config))  # fmt: skip
                log.info("%s: finished already, reusing its results", run_dir)
                summary = read_json(summary_file)
            else:
                resume = any((run_dir / "checkpoints").glob("step_*"))
                # a seed's run killed before its first checkpoint starts again from scratch
                summary = train(config, run_dir, resume=resume, restart=True)
            done[label] = run_dir
            results[label].append(summary.get("results", {}))
    return {label: compare(results[label], paper.results, paper.evaluator, paper.stand_in)
            for label, paper in papers.items()}  # fmt: skip


def compare(runs: list[dict], paper: dict, evaluator: str = "official",
            stand_in: str | None = None) -> list[dict]:  # fmt: skip
    """Per metric: the paper's number, ours (mean, std over the runs, n) and the difference.

    Ours is scored the way the paper scored (``evaluator``): for ``vladapter`` a run's
    ``"<key>_vladapter"`` result where it has one (``scored_by`` says which), else the official
    headline, which every row also carries (``official``). ``stand_in`` marks every row of a
    recipe that stands in for the paper's experiment."""
    rows = []
    suffixes = [reference_key("", e) for e in EVALUATORS if e != "official"]

    def metric(key: str) -> str:  # a reference score's key names the metric it scores
        return next((key.removesuffix(s) for s in suffixes if key.endswith(s)), key)

    keys = [metric(k) for k in [*paper, *(k for r in runs for k in r)]]
    for key in dict.fromkeys(keys):
        official = summarise([r.get(key) for r in runs])
        ours, scored_by = official, "official"
        if evaluator != "official":
            alternative = summarise([r.get(reference_key(key, evaluator)) for r in runs])
            if alternative["n"]:
                ours, scored_by = alternative, evaluator
        reported = paper.get(key)
        mean = ours["mean"]
        diff = mean - reported if mean is not None and reported is not None else None
        rows.append({"metric": key, "paper": reported, **ours, "diff": diff,
                     "scored_by": scored_by, "official": official, "stand_in": stand_in})  # fmt: skip
    return rows


def summarise(scores: list) -> dict:
    """Mean, std and n of the runs' scores; a missing or non-finite one is left out."""
    ours = [s for s in scores if s is not None and math.isfinite(s)]
    mean = statistics.fmean(ours) if ours else None
    std = statistics.stdev(ours) if len(ours) > 1 else None
    return {"mean": mean, "std": std, "n": len(ours)}


def render(path: Path, comparison: dict) -> str:
    """The Markdown table of :func:`run_recipe`'s comparison, a section per stage."""
    lines = [f"# {path.stem}", ""]
    for stage, rows in comparison.items():
        if len(comparison) > 1:
            lines += [f"## stage {stage}", ""]
        lines += [
            "| metric | paper | ours | Δ | scored by | official |",
            "|---|---|---|---|---|---|",
        ]
        for row in rows:
            diff = "–" if row["diff"] is None else f"{row['diff']:+.2f}"
            metric = row["metric"] + (" (stand-in)" if row["stand_in"] else "")
            lines.append(f"| {metric} | {number(row['paper'])} | {score(row)} | {diff} "
                         f"| {row['scored_by']} | {score(row['official'])} |")  # fmt: skip
        stand_in = next((row["stand_in"] for row in rows if row["stand_in"]), None)
        lines += ["", f"Stand-in: {stand_in.rstrip('.')}."] if stand_in else []
        lines.append("")
    return "\n".join(lines)


def number(value, digits=2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def score(summary: dict) -> str:
    """``mean ± std (n=…)`` of :func:`summarise`."""
    text = number(summary["mean"]) + (
        f" ± {number(summary['std'])}" if summary["std"] is not None else ""
    )
    return text + (f" (n={summary['n']})" if summary["n"] else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a paper recipe and compare with the paper.")
    parser.add_argument("recipe", nargs="?", help="a recipe file or shipped recipe name")
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. data.root=/datasets"
    )
    parser.add_argument("--list", action="store_true", help="every recipe with its paper numbers")
    parser.add_argument("--params", action="store_true",
                        help="with --list: our trainable parameters beside the paper's")  # fmt: skip
    parser.add_argument(
        "--check-data", action="store_true", help="report missing data files and weights"
    )
    parser.add_argument(
        "--root", default=None, metavar="DIR", help="the data root (the same as data.root=DIR)"
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds to run (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="default runs/reproduce/<recipe>")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)  # options before or after the overrides
    try:
        if args.list:  # tables only: the meta-device builds of --params log nothing
            print(list_recipes())
            if args.params:
                print("\n" + params_table())
            return 0
        if args.params:
            parser.error("--params goes with --list")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        if not args.recipe:
            parser.error("name a recipe (or --list)")
        path = find_recipe(args.recipe)
        if args.root:
            args.overrides = [*args.overrides, f"data.root={args.root}"]
        if args.check_data:
            rows = check_data(path, args.overrides)
            for what, stage, status in rows:
                print(f"{what:24} {stage:10} {status}")
            return 0 if all(s.startswith("ok") for _, _, s in rows) else 1
        if args.seeds < 1:
            parser.error("--seeds must be >= 1")
        out = args.out or Path("runs") / "reproduce" / path.stem
        comparison = run_recipe(path, args.seeds, out, args.overrides)
    except (ConfigError, RunError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    rank, _ = distributed_env()
    if rank == 0:
        text = render(path, comparison)
        write_json(out / "reproduce.json", comparison)
        atomic_write(out / "reproduce.md", lambda t: Path(t).write_text(text))
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
