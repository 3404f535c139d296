"""Building a run from its config, and loading a finished run back (evaluation, export)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import PreTrainedModel

import vlpeft
from launch.config import (
    ConfigError,
    RunError,
    TrainConfig,
    load_config,
    read_recipe,
    stage_names,
)  # fmt: skip
from launch.engine import deepspeed_config
from tasks.base import TaskConfig, get_task
from tasks.router import CACHE_FOLDER, TaskRouter, load_yaml
from tasks.vqa import most_frequent_answers
from vlpeft.adapters.base import MethodConfig
from vlpeft.inject import find_targets
from vlpeft.models import get_family


def build_router(config: TrainConfig) -> TaskRouter:
    """The configured tasks: entries of ``data.file`` updated by ``data.tasks``; their relative
    paths resolve against ``data.root`` when set, else the task file's folder."""
    path = Path(config.data.file)
    merged = configured_tasks(config)
    base = Path(config.data.root) if config.data.root else path.parent
    if config.data.root and not base.is_dir():
        raise ConfigError(f"data.root {config.data.root}: no such folder")
    return TaskRouter.from_dict(merged, base, where=str(path), cache_dir=record_cache(config))


def configured_tasks(config: TrainConfig) -> dict[str, dict]:
    """Each task of ``data.tasks``: its ``data.file`` entry updated by its settings
    (:func:`task_entry`); a task the file lacks is an error naming both."""
    path = Path(config.data.file)
    entries = load_yaml(path) or {}
    merged = {}
    for name, settings in config.data.tasks.items():
        if name not in entries:
            raise ConfigError(f"data.tasks.{name}: not in {path} (it has {sorted(entries)})")
        merged[name] = task_entry(entries[name], settings)
    return merged


def task_entry(entry: dict, settings: dict | None) -> dict:
    """A task of ``data.file`` updated by its ``data.tasks`` settings; ``splits`` and ``options``
    are updated key by key (``data.tasks.gqa.splits: {train: train+val}`` keeps the file's val
    and test, ``data.tasks.vqa.options: {target: sampled}`` its ``karpathy`` file)."""
    settings = settings or {}
    merged = {**entry, **settings}
    for key in ("splits", "options"):
        if isinstance(entry.get(key), dict) and isinstance(settings.get(key), dict):
            merged[key] = {**entry[key], **settings[key]}
    return merged


def record_cache(config: TrainConfig) -> Path | None:
    """Where the parsed splits are cached: ``data.cache_dir``, by default beside the data file
    (``off``: nowhere)."""
    if config.data.cache_dir == "off":
        return None
    return Path(config.data.cache_dir or Path(config.data.file).parent / CACHE_FOLDER)


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
    tokens = [t.config.max_new_tokens for t in router.tasks.values()]
    check_text_positions(config, model, router.tasks.values(), tokens)
    for name, method in adapter_methods(config, model).items():
        vlpeft.add_adapter(model, method, name=name)
    return model


def adapter_methods(config: TrainConfig, model) -> dict[str, MethodConfig]:
    """Each adapter set's method config (:meth:`TrainConfig.adapter_sets`) with its targets
    resolved on ``model`` (explicit module names honoured as given; else the family's
    components × kinds) and the family's trainable tensors added."""
    methods = {}
    for name, adapter_set in config.adapter_sets().items():
        method = adapter_set.method
        if adapter_set.explicit:  # module names: honoured as given (validate refuses a mix)
            trainable = list(dict.fromkeys([*method.trainable, *model.trainable_patterns]))
            methods[name] = dataclasses.replace(method, trainable=trainable)
        else:
            methods[name] = model.adapter_config(
                method, adapter_set.components, adapter_set.kinds, adapter_set.route_components
            )
    return methods


def check_offline(config: TrainConfig) -> dict:
    """What can be checked of a config without its data or weights (``launch.train --validate``):
    every task entry of ``data.file``, the model at its size on the meta device (no memory, no
    download) with every adapter set placed — a method whose ranks need the weights (Null-LoRA's
    null space) is checked for its targets only — and the DeepSpeed JSON. Returns a report
    (parameter counts, per set the adapted layers); raises ConfigError naming the problem."""
    path = Path(config.data.file)
    tasks = configured_tasks(config)
    for name, entry in tasks.items():
        try:
            task_config = TaskConfig.from_dict(entry, f"{path}: {name}")
            get_task(task_config.reader)(task_config)  # the task's own option checks
        except ValueError as err:
            raise ConfigError(str(err)) from None
        adapter = entry.get("adapter", "default")
        if adapter not in config.adapters and config.adapters:
            raise ConfigError(
                f"data.tasks.{name}: trains adapter set {adapter!r}, not defined under adapters "
                f"({sorted(config.adapters)})"
            )
    overrides = {**config.model.overrides, "pretrained": False}  # the size, not the weights
    overrides.pop("weights", None)

    def meta_model():
        with torch.device("meta"):
            return vlpeft.build_model(config.model.family, config.model.preset, **overrides)

    report = {"family": config.model.family, "preset": config.model.preset, "sets": {}}
    try:
        model = meta_model()
        methods = adapter_methods(config, model)  # names and settings: the same on a fresh model
        for name, method in methods.items():
            try:
                with torch.device("meta"):
                    vlpeft.add_adapter(model, method, name=name)
            except (RuntimeError, NotImplementedError) as err:
                if "meta" not in str(err).lower():
                    raise
                # its ranks come from the weights (Null-LoRA's null space): its targets only,
                # on a fresh model (the failed injection may have replaced some layers)
                model = meta_model()
                for earlier, info in report["sets"].items():
                    if "checked" in info:  # itself checked for its targets only
                        continue
                    with torch.device("meta"):
                        vlpeft.add_adapter(model, methods[earlier], earlier)
                found = find_targets(model, method.targets)
                report["sets"][name] = {"method": method.method, "layers": len(found),
                                        "checked": "targets only (needs the weights)"}  # fmt: skip
                continue
            layers = sum(1 for _, layer in vlpeft.adapted_layers(model)
                         if name in layer.adapter_names)  # fmt: skip
            report["sets"][name] = {"method": method.method, "layers": layers}
        if config.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"model {config.model.family}/{config.model.preset}: {err}") from None
    cached = [name for name, entry in tasks.items() if entry.get("features")]
    if cached and getattr(model, "cached_part", None) is None:
        raise ConfigError(
            f"data.tasks.{cached[0]}.features: {config.model.family} reads no cached visual "
            "features (clip-bart, roberta-vit and gpt2-vit do): train it from pixels"
        )
    readers = [get_task(entry["reader"]) for entry in tasks.values() if "reader" in entry]
    tokens = [entry.get("max_new_tokens") for entry in tasks.values()]
    check_text_positions(config, model, readers, tokens)
    report["trainable"], report["total"] = vlpeft.count_parameters(model)
    if any("checked" in info for info in report["sets"].values()):
        report["trainable"] = None  # the ranks are the weights'
    return report


def check_text_positions(config: TrainConfig, model, tasks, task_tokens=()) -> None:
    """Texts longer than the model's positions (``model.overrides.max_text_length``,
    ``eval.max_new_tokens`` or a task's own ``max_new_tokens``, visual tokens that take positions)
    would fail in the middle of the run: refused now, naming the sequence and the keys.
    ``tasks``: the run's task classes; ``task_tokens``: the tasks' ``max_new_tokens`` (None: the
    eval section's)."""
    images = max((getattr(task, "images_per_record", 1) for task in tasks), default=1)
    longest = max([config.eval.max_new_tokens, *(t for t in task_tokens if t)])
    for sequence, needed, limit in model.text_positions(longest, images):
        if needed > limit:
            raise ConfigError(
                f"model {config.model.family}/{config.model.preset}: {sequence} needs "
                f"{needed} positions, the model has {limit} (model.overrides.max_text_length "
                f"{model.config.max_text_length}, eval.max_new_tokens or a task's "
                f"max_new_tokens: {longest}): lower them"
            )


def validate_config(path: Path, overrides=(), stage: str | None = None) -> dict:
    """``launch.train --validate``: loads the config (each stage of a recipe, or ``stage``) and
    checks what can be checked without data or weights (:func:`check_offline`); prints a report."""
    names = [stage] if stage else stage_names(read_recipe(path), str(path)) or [None]
    reports = {}
    for name in names:
        config = load_config(path, overrides, stage=name)
        if config.deepspeed.enabled:
            deepspeed_config(config, world=1)  # the JSON parses and agrees with the config
        report = check_offline(config)
        reports[name or "config"] = report
        sets = ", ".join(
            f"{set_name}: {info['method']} on {info['layers']} layers"
            + (f" ({info['checked']})" if "checked" in info else "")
            for set_name, info in report["sets"].items()
        )
        trainable = report["trainable"]
        counted = (
            "an unknown number (ranks from the weights)" if trainable is None else f"{trainable:,}"
        )
        print(
            f"{path}{f' (stage {name})' if name else ''}: valid — {report['family']}/"
            f"{report['preset']}, {counted} of {report['total']:,} parameters train; "
            f"{sets or 'no adapters'}"
        )
    return reports


def method_name(config: TrainConfig) -> str:
    """A short description of the adapter sets as the config words them, e.g. ``lora r=8 proj``
    (a setting left to its default is not named)."""
    parts = []
    for spec in config.adapters.values():
        words = [spec.get("method", "?")]
        for key in ("r", "bottleneck", "routing"):
            if spec.get(key) is not None:
                words.append(f"{key}={spec[key]}" if key != "routing" else str(spec[key]))
        parts.append(" ".join(words))
    name = " + ".join(dict.fromkeys(parts))
    return name + (f" + resora {config.resora.get('kind', 'linear')}" if config.resora else "")


def enable_gradient_checkpointing(model: torch.nn.Module) -> list[str]:
    """Non-reentrant gradient checkpointing on every transformers part of ``model`` (reentrant
    checkpointing would hide the recomputes from ReSoRA's recorder); returns their paths."""
    enabled = []
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            if any(name.startswith(f"{done}.") for done in enabled if done):
                continue
            kwargs = {"use_reentrant": False}
            if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.2x
                module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            enabled.append(name)
    if not enabled:
        raise ConfigError(
            f"train.gradient_checkpointing: {type(model).__name__} has no transformers part "
            "that supports it"
        )
    return enabled


def evaluated_splits(config: TrainConfig) -> list[str]:
    """The splits a run evaluates: ``eval.splits``, and ``val`` when it validates; once each."""
    return list(dict.fromkeys([*config.eval.splits, *(["val"] if config.eval.val_every else [])]))


def check_eval_splits(router: TaskRouter, config: TrainConfig) -> None:
    """Reads every split the run will evaluate before training, so a bad test file (an image
    without captions, a missing image) is an error now, not after the training."""
    for task in router.tasks.values():
        for split in evaluated_splits(config):
            task.read(split, limit=config.eval.max_records)


def warm_record_caches(router: TaskRouter, config: TrainConfig) -> None:
    """Reads every split the run uses into its record cache (local rank 0, before the others)."""
    for task in router.tasks.values():
        if task.cache_dir is not None:
            for split in dict.fromkeys(["train", *evaluated_splits(config)]):
                task.read_named(task.split_name(split))


def check_eval_features(router: TaskRouter, config: TrainConfig, model) -> None:
    """The feature caches of the splits the run evaluates hold every image of them, unchanged,
    in intact shards — checked now, not found out after the training."""
    for name, task in router.tasks.items():
        if task.config.features:
            for split in evaluated_splits(config):
                router.dataset(name, split, model, limit=config.eval.max_records).check_features()


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
