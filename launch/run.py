"""Building a run from its config, and loading a finished run back (evaluation, export)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import vlpeft
from launch.config import PLACEMENT_KEYS, ConfigError, TrainConfig, load_config
from tasks.router import TaskRouter, load_yaml
from tasks.vqa import most_frequent_answers
from vlpeft.adapters.base import MethodConfig
from vlpeft.models import get_family


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (missing files, a run already there)."""


def build_router(config: TrainConfig) -> TaskRouter:
    """The configured tasks: entries of ``data.file`` updated by ``data.tasks``; their relative
    paths resolve against ``data.root`` when set, else the task file's folder."""
    path = Path(config.data.file)
    entries = load_yaml(path) or {}
    merged = {}
    for name, settings in config.data.tasks.items():
        if name not in entries:
            raise ConfigError(f"data.tasks.{name}: not in {path} (it has {sorted(entries)})")
        merged[name] = {**entries[name], **(settings or {})}
    base = Path(config.data.root) if config.data.root else path.parent
    if config.data.root and not base.is_dir():
        raise ConfigError(f"data.root {config.data.root}: no such folder")
    return TaskRouter.from_dict(merged, base, where=str(path))


def build_model(config: TrainConfig, router: TaskRouter):
    """The backbone with every adapter set of ``config.adapters`` injected.

    A classifier family (``classifies_answers``) gets the answer vocabulary of the tasks' training
    answers unless the config names one; the resolved config records it."""
    overrides = dict(config.model.overrides)
    if get_family(config.model.family).classifies_answers and "answers" not in overrides:
        answers = [a for task in router.tasks.values() for a in task.answers(task.read("train"))]
        overrides["answers"] = most_frequent_answers(answers, overrides.get("num_answers", 3129))
        config.model.overrides = overrides
    model = vlpeft.build_model(config.model.family, config.model.preset, **overrides)
    sets = router.adapter_sets()
    missing = [s for s in sets if s not in config.adapters]
    if missing:
        raise ConfigError(
            f"tasks {[sets[m] for m in missing]} train adapter set(s) {missing}, not defined under adapters"
        )
    for name, spec in config.adapters.items():
        spec = dict(spec)
        placement = [spec.pop(key, None) for key in PLACEMENT_KEYS]
        if "targets" in spec:  # explicit module names: honoured as given (validate refuses a mix)
            method = MethodConfig.from_dict(spec, where=f"adapters.{name}")
            trainable = list(dict.fromkeys([*method.trainable, *model.trainable_patterns]))
            method = dataclasses.replace(method, trainable=trainable)
        else:
            method = MethodConfig.from_dict({"targets": ["_"], **spec}, where=f"adapters.{name}")
            method = model.adapter_config(method, *placement)
        vlpeft.add_adapter(model, method, name=name)
    return model


def finished_run_config(run_dir: str | Path, what: str = "") -> TrainConfig:
    """The training config of a finished run (its ``config.yaml``), after checking that the run
    left its trained adapters; ``what`` prefixes the errors (e.g. ``"train.init_from"``)."""
    run_dir = Path(run_dir)
    where = f"{what} {run_dir}".strip()
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{where}: no config.yaml (is it a run directory of launch.train?)")
    adapters = run_dir / "adapters"
    if not (adapters / "adapter_config.json").is_file() and not any(
        adapters.glob("*/adapter_config.json")
    ):
        raise RunError(f"{where}: no trained adapters in {adapters} (did the run finish?)")
    return load_config(run_dir / "config.yaml")


def load_run(run_dir: str | Path):
    """(model with the run's final adapters, router, config) of a finished run."""
    config = finished_run_config(run_dir)
    router = build_router(config)
    model = build_model(config, router)
    vlpeft.load_adapter(model, Path(run_dir) / "adapters")
    return model.eval(), router, config
