"""Per-task adapter export: ``python -m launch.export RUN_DIR --task T --out DIR [--format F]``.

A multitask run trains adapter sets (shared by several tasks or one per task) and switches the
routing function per task. Exporting task T writes what T needs, self-contained:

- ``vlpeft`` (default): ``adapter_config.json`` + ``adapter_model.safetensors`` of T's adapter set
  (its layers plus every tensor the run trained outside adapter layers, whichever set declared
  it: shared embeddings and norms, heads, the visual projection), with T's routing function
  written into the config, and ``task.json``
  (the base model to build, T's reader and prompt). :func:`load_exported` rebuilds the base model
  and loads it; the result predicts exactly as the run's model does on T.
- ``peft-lora``: the same adapter as a peft LoRA checkpoint of the whole VL model
  (``peft.PeftModel.from_pretrained(vlpeft.build_model(...), DIR)``) plus ``task.json``; only for
  adapters that reduce to plain LoRA (LoRA, Null-LoRA, FLoRA-linear without routing).
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
    if info["format"] == "peft-lora":
        from peft import PeftModel

        PeftModel.from_pretrained(model, directory)  # injects into ``model`` in place
    else:
        vlpeft.load_adapter(model, directory, name=info["adapter"])
        vlpeft.set_active_adapter(model, info["adapter"])
    return model.eval(), info


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Export one task's adapter from a finished run.")
    parser.add_argument("run_dir", type=Path, help="a finished run directory (launch.train --out)")
    parser.add_argument("--task", required=True, help="the task to export, e.g. vqa")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--format", default="vlpeft", choices=FORMATS)
    args = parser.parse_args(argv)
    try:
        out = export_task(args.run_dir, args.task, args.out, args.format)
    except (RunError, DataError, FileNotFoundError, KeyError, TypeError, ValueError) as err:
        sys.exit(f"error: {err.args[0] if isinstance(err, KeyError) else err}")
    print(f"exported {args.task} ({args.format}) to {out}")
    return out


if __name__ == "__main__":
    main()
