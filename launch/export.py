"""Per-task adapter export: ``python -m launch.export RUN_DIR --task T --out DIR [--format F]``,
or a merge of per-task adapters: ``python -m launch.export RUN_DIR --merge vqa=1,caption=0.5
[--method ties --density 0.5 --rank K --seed S] --out DIR [--format F]``.

A multitask run trains adapter sets (shared by several tasks or one per task) and switches the
routing function per task. Exporting task T writes what T needs, self-contained:

- ``vlpeft`` (default): ``adapter_config.json`` + ``adapter_model.safetensors`` of T's adapter set
  (its layers plus every tensor the run trained outside adapter layers, whichever set declared
  it: shared embeddings and norms, heads, the visual projection), with T's routing function
  written into the config, and ``task.json``
  (the base model to build, T's reader and prompt). :func:`load_exported` rebuilds the base model
  and loads it; the result predicts exactly as the run's model does on T.
- ``peft-lora``: the same adapter as a peft LoRA checkpoint of the VL model's text backbone
  (``peft.PeftModel.from_pretrained(<the backbone>, DIR)``) + ``vlpeft_extra.*`` (the wrapper's
  trained tensors; ``vlpeft.load_peft_lora`` reads both) plus ``task.json``; only for
  adapters that reduce to plain LoRA (LoRA, Null-LoRA, FLoRA-linear without routing).

``--merge TASK=W,…`` (then ``--task`` is not needed) merges the adapter sets of the named tasks
(one set per task) with :func:`vlpeft.merge_task_adapters` (``--method``: cat (default), linear,
svd, ties, dare_linear, dare_ties, magnitude_prune and their ``_svd`` variants; peft's
definitions) into one adapter ``merged`` and exports it as above; ``task.json`` records the merge
and the tasks it serves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import vlpeft
from launch.run import RunError, load_run
from tasks.base import DataError
from vlpeft.checkpoint import write_json
from vlpeft.inject import adapter_configs

TASK_FILE = "task.json"
FORMATS = ("vlpeft", "peft-lora")
MERGED = "merged"


def export_task(run_dir: str | Path, task: str, out: str | Path, fmt: str = "vlpeft") -> Path:
    """Writes task ``task`` of the finished run at ``run_dir`` to ``out``; returns ``out``."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {list(FORMATS)}")
    model, router, config = load_run(run_dir)
    if task not in router.tasks:
        raise KeyError(
            f"{run_dir}: the run trained no task {task!r}; it has {sorted(router.tasks)}"
        )
    router.activate(model, task)
    task_config = router[task].config
    out = Path(out)
    # What T's forward uses: its set's layers with T's routing, and every tensor the run trained
    # outside adapter layers (any set may have declared shared ones; all tasks use them).
    configs = adapter_configs(model)
    own = configs[task_config.adapter]
    shared = list(dict.fromkeys(p for c in configs.values() for p in c.trainable))
    changes = {"trainable": shared}
    if task_config.routing and getattr(own, "routing", None):
        changes["routing"] = task_config.routing
    configs[task_config.adapter] = dataclasses.replace(own, **changes)
    if fmt == "vlpeft":
        vlpeft.save_adapter(model, out, name=task_config.adapter)
    else:
        vlpeft.export_peft_lora(model, out, task_config.adapter)
    write_json(
        out / TASK_FILE,
        {
            "format": fmt,
            "task": task,
            "adapter": task_config.adapter,
            "routing": task_config.routing,
            "model": {
                "family": config.model.family,
                "preset": config.model.preset,
                "overrides": config.model.overrides,
            },
            "reader": task_config.reader,
            "prompt": task_config.prompt,
            "options": task_config.options,
            "run": str(Path(run_dir).resolve()),
        },
    )
    return out


def parse_weights(text: str) -> dict[str, float]:
    """``"vqa=1,caption=0.5"`` → ``{"vqa": 1.0, "caption": 0.5}``, with errors naming the item."""
    weights: dict[str, float] = {}
    for item in (i.strip() for i in text.split(",")):
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            weight = float(value) if sep and name else None
        except ValueError:
            weight = None
        if weight is None:
            raise ValueError(f"--merge: {item!r} is not TASK=WEIGHT (e.g. vqa=1,caption=0.5)")
        if name in weights:
            raise ValueError(f"--merge: task {name!r} is named twice")
        weights[name] = weight
    return weights


def export_merged(
    run_dir: str | Path,
    weights: dict[str, float],
    out: str | Path,
    method: str = "cat",
    density: float | None = None,
    rank: int | None = None,
    seed: int = 0,
    fmt: str = "vlpeft",
) -> Path:
    """Merges the adapter sets of the tasks in ``weights`` (task → weight) of the finished run at
    ``run_dir`` into adapter ``merged`` and writes it to ``out``; returns ``out``."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {list(FORMATS)}")
    model, router, config = load_run(run_dir)
    unknown = [t for t in weights if t not in router.tasks]
    if unknown:
        raise KeyError(
            f"{run_dir}: the run trained no task {unknown[0]!r}; it has {sorted(router.tasks)}"
        )
    sets = {t: router[t].config.adapter for t in weights}
    owners: dict[str, str] = {}
    for task, adapter in sets.items():
        if adapter in owners:
            raise ValueError(
                f"{run_dir}: tasks {owners[adapter]!r} and {task!r} train the same adapter set "
                f"{adapter!r}: a merge needs one adapter set per task"
            )
        owners[adapter] = task
    vlpeft.merge_task_adapters(
        model,
        {sets[t]: w for t, w in weights.items()},
        method=method,
        name=MERGED,
        density=density,
        rank=rank,
        seed=seed,
    )
    configs = adapter_configs(model)
    shared = list(dict.fromkeys(p for c in configs.values() for p in c.trainable))
    configs[MERGED] = dataclasses.replace(configs[MERGED], trainable=shared)
    out = Path(out)
    if fmt == "vlpeft":
        vlpeft.save_adapter(model, out, name=MERGED)
    else:
        vlpeft.export_peft_lora(model, out, MERGED)
    merge = {"weights": weights, "adapters": sets, "method": method, "density": density,
             "rank": rank, "seed": seed}  # fmt: skip
    write_json(
        out / TASK_FILE,
        {
            "format": fmt,
            "task": None,
            "tasks": {
                t: {"reader": router[t].config.reader, "prompt": router[t].config.prompt}
                for t in weights
            },
            "adapter": MERGED,
            "routing": None,
            "merge": merge,
            "model": {
                "family": config.model.family,
                "preset": config.model.preset,
                "overrides": config.model.overrides,
            },
            "run": str(Path(run_dir).resolve()),
        },
    )
    return out


def load_exported(directory: str | Path):
    """(model, task description) from an export: the base model built fresh, the task's adapter
    loaded and active (with its routing function)."""
    directory = Path(directory)
    path = directory / TASK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not an export directory (written by launch.export)")
    info = json.loads(path.read_text())
    spec = info["model"]
    model = vlpeft.build_model(spec["family"], spec["preset"], **spec["overrides"])
    if info["format"] == "peft-lora":  # the backbone's peft checkpoint + the wrapper's side file
        vlpeft.load_peft_lora(model, directory, name=info["adapter"])
    else:
        vlpeft.load_adapter(model, directory, name=info["adapter"])
    vlpeft.set_active_adapter(model, info["adapter"])
    return model.eval(), info


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description="Export one task's adapter, or a merge of per-task adapters, from a finished run."
    )
    parser.add_argument("run_dir", type=Path, help="a finished run directory (launch.train --out)")
    parser.add_argument("--task", help="the task to export, e.g. vqa")
    parser.add_argument(
        "--merge", help="merge per-task adapters instead: TASK=W,… e.g. vqa=1,caption=0.5"
    )
    parser.add_argument("--method", default="cat", help="merge method (with --merge): cat, linear, "
                        "svd, ties, dare_linear, dare_ties, magnitude_prune, *_svd")  # fmt: skip
    parser.add_argument("--density", type=float, help="fraction kept by ties/dare/magnitude_prune")
    parser.add_argument("--rank", type=int, help="rank of the _svd methods (default: the largest)")
    parser.add_argument("--seed", type=int, default=0, help="DARE's seed")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--format", default="vlpeft", choices=FORMATS)
    args = parser.parse_args(argv)
    if (args.task is None) == (args.merge is None):
        parser.error("name one of --task T or --merge TASK=W,…")
    merge_only = [f"--{k}" for k in ("density", "rank") if getattr(args, k) is not None]
    if args.merge is None and (merge_only or args.method != "cat"):
        parser.error(f"{(merge_only or ['--method'])[0]} is an option of --merge")
    try:
        if args.merge is None:
            out = export_task(args.run_dir, args.task, args.out, args.format)
            what = args.task
        else:
            weights = parse_weights(args.merge)
            out = export_merged(args.run_dir, weights, args.out, args.method, args.density,
                                args.rank, args.seed, args.format)  # fmt: skip
            what = f"{args.method} merge of {', '.join(f'{t}×{w:g}' for t, w in weights.items())}"
    except (RunError, DataError, FileNotFoundError, KeyError, TypeError, ValueError) as err:
        sys.exit(f"error: {err.args[0] if isinstance(err, KeyError) else err}")
    print(f"exported {what} ({args.format}) to {out}")
    return out


if __name__ == "__main__":
    main()
