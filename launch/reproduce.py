"""The papers' recipes: ``python -m launch.reproduce RECIPE [--seeds N] [key=value …]``.

A recipe (``launch/configs/recipes/*.yaml``) is a training config with a ``paper:`` section (source,
table, split, ``results: {"<task>/<split>": number}``) and possibly ``stages`` (run in order; a
later stage's ``train.init_from: stage:<name>`` starts from that stage's run of the same seed).
This command trains every stage for each seed (seed k adds k to ``train.seed`` and
``sampler.seed``), evaluates, and prints our numbers beside the paper's: mean ± std over the seeds
and the difference. A finished stage (its ``run.json``) is reused and an interrupted one resumed,
so running the command again continues a reproduction.

    python -m launch.reproduce --list                        # every recipe and its paper numbers
    python -m launch.reproduce R data.root=/datasets --check-data   # which files are missing
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

from launch.config import (
    STAGE_PREFIX,
    ConfigError,
    load_config,
    read_json,
    read_recipe,
    stage_names,
)  # fmt: skip
from launch.distributed import distributed_env
from launch.resume import EXECUTION_KEYS, config_changes
from launch.run import RunError, build_router, evaluated_splits
from launch.train import train
from tasks.base import DataError
from vlpeft.checkpoint import atomic_write, write_json

log = logging.getLogger("vlpeft.reproduce")
RECIPES = Path(__file__).resolve().parent / "configs" / "recipes"
# a finished run's results answer its evaluation settings too: only validation may differ
REUSE_FREE = (*(k for k in EXECUTION_KEYS if k != "eval."), "eval.val_every")
REUSE_HINT = (
    "its results belong to that config: pass another --out, or remove the run to retrain it"
)


def recipe_files() -> list[Path]:
    return sorted(RECIPES.glob("*.yaml"))


def find_recipe(name: str) -> Path:
    """A recipe by path, or by its name among the shipped ones (``routing_tab7_lora_proj``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = RECIPES / f"{path.stem}.yaml"
    if shipped.is_file():
        return shipped
    names = [p.stem for p in recipe_files()]
    raise ConfigError(f"recipe {name!r}: not a file nor a shipped recipe ({len(names)}: --list)")


def stage_configs(path: Path, overrides=()) -> list[tuple[str | None, object]]:
    """(stage name or None, loaded config) of every stage of the recipe, in run order."""
    names = stage_names(read_recipe(path), str(path)) or [None]
    return [(name, load_config(path, overrides, stage=name)) for name in names]


def paper_results(config) -> dict[str, float]:
    results = (config.paper or {}).get("results") or {}
    if not isinstance(results, dict):
        raise ConfigError("paper.results: expected a mapping '<task>/<split>': number")
    return results


def list_recipes() -> str:
    """A Markdown table: every recipe (and stage) with its source table and numbers."""
    lines = ["| recipe | paper | table | reported |", "|---|---|---|---|"]
    for path in recipe_files():
        for name, config in stage_configs(path):
            paper = config.paper or {}
            numbers = ", ".join(f"{k} {v}" for k, v in paper_results(config).items())
            label = path.stem + (f" ({name})" if name else "")
            source = str(paper.get("source", "")).split(".")[0]
            lines.append(f"| {label} | {source} | {paper.get('table', '')} | {numbers} |")
    return "\n".join(lines)


def check_data(path: Path, overrides=()) -> list[tuple[str, str, str]]:
    """(task/split, stage, problem or "") for every split the recipe trains and evaluates."""
    rows, seen = [], set()
    for name, config in stage_configs(path, overrides):
        try:
            router = build_router(config)
        except (ConfigError, DataError) as err:
            rows.append(("data.file", name or "", str(err)))
            continue
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
    return rows


def seed_overrides(config, seed: int) -> list[str]:
    """Seed ``seed`` (0: the recipe's own) of a multi-seed reproduction."""
    return [f"train.seed={config.train.seed + seed}", f"sampler.seed={config.sampler.seed + seed}"]


def run_recipe(path: Path, seeds: int, out: Path, overrides=()) -> dict:
    """Trains and evaluates every stage for each seed; returns the comparison per stage."""
    stages = stage_configs(path, overrides)
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
                               hint=REUSE_HINT, free=REUSE_FREE)  # fmt: skip
                log.info("%s: finished already, reusing its results", run_dir)
                summary = read_json(summary_file)
            else:
                resume = any((run_dir / "checkpoints").glob("step_*"))
                # a seed's run killed before its first checkpoint starts again from scratch
                summary = train(config, run_dir, resume=resume, restart=True)
            done[label] = run_dir
            results[label].append(summary.get("results", {}))
    comparison = {}
    for name, config in stages:
        label = name or "run"
        comparison[label] = compare(results[label], paper_results(config))
    return comparison


def compare(runs: list[dict], paper: dict) -> list[dict]:
    """Per metric: the paper's number, ours (mean, std over the runs, n) and the difference."""
    rows = []
    for key in dict.fromkeys([*paper, *(k for r in runs for k in r)]):
        # a missing or non-finite score is left out (and n says how many runs had one)
        ours = [r[key] for r in runs if r.get(key) is not None and math.isfinite(r[key])]
        mean = statistics.fmean(ours) if ours else None
        std = statistics.stdev(ours) if len(ours) > 1 else None
        reported = paper.get(key)
        diff = mean - reported if mean is not None and reported is not None else None
        rows.append({"metric": key, "paper": reported, "mean": mean, "std": std, "n": len(ours),
                     "diff": diff})  # fmt: skip
    return rows


def render(path: Path, comparison: dict) -> str:
    def number(value, digits=2):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [f"# {path.stem}", ""]
    for stage, rows in comparison.items():
        if len(comparison) > 1:
            lines += [f"## stage {stage}", ""]
        lines += ["| metric | paper | ours | Δ |", "|---|---|---|---|"]
        for row in rows:
            ours = number(row["mean"]) + (
                f" ± {number(row['std'])}" if row["std"] is not None else ""
            )
            ours += f" (n={row['n']})" if row["n"] else ""
            diff = "–" if row["diff"] is None else f"{row['diff']:+.2f}"
            lines.append(f"| {row['metric']} | {number(row['paper'])} | {ours} | {diff} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a paper recipe and compare with the paper.")
    parser.add_argument("recipe", nargs="?", help="a recipe file or shipped recipe name")
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. data.root=/datasets"
    )
    parser.add_argument("--list", action="store_true", help="every recipe with its paper numbers")
    parser.add_argument("--check-data", action="store_true", help="report missing data files")
    parser.add_argument(
        "--root", default=None, metavar="DIR", help="the data root (the same as data.root=DIR)"
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds to run (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="default runs/reproduce/<recipe>")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)  # options before or after the overrides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        if args.list:
            print(list_recipes())
            return 0
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
