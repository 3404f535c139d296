"""The training config: one YAML file per experiment, validated on load, written back resolved.

Sections (every key has a default except ``model.family`` and ``data.file``)::

    model:    {family: clip-bart, preset: tiny, overrides: {}}
    adapters: {<set name>: {method: lora, r: 8, routing: proj, components: [encoder, decoder],
               kinds: [q, v], route_components: [decoder], …method fields}}
    data:     {file: data/tasks.yaml, root: null, cache_dir: null, tasks: {vqa: {batch_size: 16,
               adapter: default, features: null}, …}}
    sampler:  {mode: proportional, temperature: 2.0, seed: 0}
    train:    {steps: 300, lr: 1e-3, weight_decay: 0.01, adam_eps: 1e-8, warmup: 0.1, grad_clip: 1.0, device: auto,
               num_workers: null, grad_accum: 1, gradient_checkpointing: false, compile: false,
               compile_mode: adapters, compile_backend: inductor, …}
    resora:   null | {kind: linear, weight: 0.1, start_step: 0, samples: tokens}
    eval:     {splits: [test], val_every: 0, max_records: null, max_new_tokens: 10, num_beams: 1, itm_k: 16,
               select: last}   (select: best keeps each adapter set's best validation step, launch.selection)
    deepspeed: {enabled: false, config: launch/ds_zero2.json}
    paper:    null | {source, table, split, results: {"<task>/<split>": number}, …} (recipes: read
              by ``launch.reproduce``, ignored by training)

``data.file`` is a task-router YAML; a relative path is taken from the working directory, else from
the config file's folder. ``data.root`` (set once, e.g. ``data.root=/datasets``) is the folder the
task file's relative paths resolve against (default: the task file's folder).

A recipe may list ``stages`` (name → a mapping of overrides applied on top of the rest of the file,
run in order by ``launch.reproduce``); ``train.init_from: stage:<name>`` names an earlier stage's run.
``load_config(path, stage=NAME)`` loads one stage.

An unknown or misspelled key is an error naming it and the nearest valid key.
``key=value`` overrides address nested keys with dots (``train.steps=50``; values parse as YAML).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from tasks.base import DataError, get_task
from tasks.router import load_yaml
from tasks.sampler import SamplerConfig
from vlpeft.adapters import ReSoRAConfig
from vlpeft.adapters.base import MethodConfig
from vlpeft.checkpoint import read_json_file
from vlpeft.config import Config, ConfigError, check, deep_merge
from vlpeft.models import get_family, preset_config

__all__ = [
    "ConfigError", "RunError", "TrainConfig", "read_json", "apply_overrides", "load_config", "read_recipe", "stage_names",
    "validate",
]  # fmt: skip
# keys of an adapter set that place it in the model (the rest are the method's fields)
PLACEMENT_KEYS = ("components", "kinds", "route_components")
PRECISIONS = ("fp32", "bf16", "fp16")
LOGGERS = ("tensorboard", "wandb")  # train.loggers (launch.logger)
DEVICE = re.compile(r"cuda:\d+")
STAGE_PREFIX = "stage:"  # train.init_from: stage:<name> — an earlier stage of the same recipe


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (missing files, a run already there)."""


@dataclasses.dataclass
class ModelSection(Config):
    family: str = ""
    preset: str = "tiny"
    overrides: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DataSection(Config):
    file: str = ""
    root: str | None = None  # where the task file's relative paths resolve (default: its folder)
    tasks: dict = dataclasses.field(default_factory=dict)
    # the parsed splits' record cache (tasks.records; default: <data file's folder>/.vlpeft_cache;
    # "off": no cache) — how a run executes: free to change on --resume
    cache_dir: str | None = None


@dataclasses.dataclass
class SamplerSection(Config):
    mode: str = "proportional"
    temperature: float = 2.0
    seed: int = 0


@dataclasses.dataclass
class TrainSection(Config):
    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 0.01
    adam_eps: float = 1e-8  # AdamW's epsilon (PyTorch's default; VL-T5 / VL-Adapter: 1e-6)
    warmup: float = 0.1  # a fraction of the steps (< 1) or a number of steps
    grad_clip: float | None = 1.0  # the max gradient norm; null: no clipping
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + loss scaler)
    # auto: the local rank's GPU when there is one, else the CPU (DeepSpeed: the engine's device)
    device: str = "auto"
    num_workers: int | None = None  # data-loading processes per training process (null: 0 on the
    # CPU, 4 on a GPU)
    grad_accum: int = 1  # consecutive sampler batches per optimizer step
    gradient_checkpointing: bool = False  # on the families' transformers parts
    compile: bool = False  # torch.compile (vlpeft.compile.compile_model); eager when unavailable
    compile_mode: str = "adapters"  # adapters (each adapter branch) | model (the model's forward)
    compile_backend: str = "inductor"  # a torch.compile backend (aot_eager: no code generation)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # where the metrics go besides metrics.jsonl (same names in each): tensorboard | wandb (W&B,
    # installed separately; it follows WANDB_MODE, WANDB_PROJECT, …). Replaces train.tensorboard
    loggers: list = dataclasses.field(default_factory=lambda: ["tensorboard"])
    wandb_project: str = "vlpeft"  # the W&B project (the run's name: its directory's)
    # start from a finished run's adapters and trained tensors with a fresh optimizer and
    # schedule (ReSoRA's stage 2, Zhu et al. Sec. 4.2); the same family, preset and adapter sets
    init_from: str | None = None
    # a non-finite loss or gradient norm: stop (the last good checkpoint stays) | skip the step
    on_nonfinite: str = "stop"
    # on_nonfinite: skip — a run that skips more than this share of its steps is an error
    max_skipped_share: float = 0.5

    @classmethod
    def from_dict(cls, data, where: str = "config.train"):
        """Also reads an older config's ``tensorboard: true|false`` (before ``loggers``)."""
        if isinstance(data, dict) and "tensorboard" in data:
            data = dict(data)
            old = data.pop("tensorboard")
            mapped = ["tensorboard"] if old else []
            if "loggers" in data and sorted(data["loggers"] or []) != mapped:
                raise ConfigError(
                    f"{where}: tensorboard: {old} contradicts loggers: {data['loggers']} "
                    "(train.tensorboard is the older spelling: keep loggers only)"
                )
            data["loggers"] = mapped
        return super().from_dict(data, where)

    def __post_init__(self) -> None:
        w = "train"
        check(
            isinstance(self.loggers, list)
            and all(name in LOGGERS for name in self.loggers)
            and len(set(self.loggers)) == len(self.loggers),
            f"{w}.loggers", f"a list of distinct names from {list(LOGGERS)}", self.loggers,
        )  # fmt: skip
        check(self.steps >= 1, f"{w}.steps", ">= 1", self.steps)
        check(self.grad_accum >= 1, f"{w}.grad_accum", ">= 1", self.grad_accum)
        check(
            self.num_workers is None or self.num_workers >= 0, f"{w}.num_workers",
            ">= 0 (or null: 0 on the CPU, 4 on a GPU)", self.num_workers,
        )  # fmt: skip
        check(
            self.precision in PRECISIONS, f"{w}.precision", f"one of {list(PRECISIONS)}",
            self.precision,
        )  # fmt: skip
        check(
            self.compile_mode in ("adapters", "model"), f"{w}.compile_mode", "adapters or model",
            self.compile_mode,
        )  # fmt: skip
        check(
            self.device in ("auto", "cpu", "cuda") or DEVICE.fullmatch(self.device) is not None,
            f"{w}.device", "auto, cpu, cuda or cuda:N", self.device,
        )  # fmt: skip
        check(math.isfinite(self.lr) and self.lr > 0, f"{w}.lr", "finite and > 0", self.lr)
        check(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"{w}.weight_decay",
            "finite and >= 0", self.weight_decay,
        )  # fmt: skip
        check(math.isfinite(self.adam_eps) and self.adam_eps > 0, f"{w}.adam_eps", "finite and > 0",
              self.adam_eps)  # fmt: skip
        check(math.isfinite(self.warmup) and self.warmup >= 0, f"{w}.warmup", "finite and >= 0",
              self.warmup)  # fmt: skip
        check(
            self.grad_clip is None or (math.isfinite(self.grad_clip) and self.grad_clip > 0),
            f"{w}.grad_clip", "> 0 (or null for no clipping)", self.grad_clip,
        )  # fmt: skip
        check(self.log_every >= 1, f"{w}.log_every", ">= 1", self.log_every)
        check(self.checkpoint_every >= 0, f"{w}.checkpoint_every", ">= 0", self.checkpoint_every)
        check(self.keep_checkpoints >= 1, f"{w}.keep_checkpoints", ">= 1", self.keep_checkpoints)
        check(
            self.on_nonfinite in ("stop", "skip"), f"{w}.on_nonfinite", "stop or skip",
            self.on_nonfinite,
        )  # fmt: skip
        check(
            math.isfinite(self.max_skipped_share) and 0 <= self.max_skipped_share <= 1,
            f"{w}.max_skipped_share", "a share in [0, 1]", self.max_skipped_share,
        )  # fmt: skip


@dataclasses.dataclass
class EvalSection(Config):
    splits: list = dataclasses.field(default_factory=lambda: ["test"])
    val_every: int = 0
    max_records: int | None = None
    max_new_tokens: int = 10
    num_beams: int = 1
    itm_k: int = 16
    select: str = "last"

    def __post_init__(self) -> None:
        check(self.val_every >= 0, "eval.val_every", ">= 0", self.val_every)
        check(self.select in ("last", "best"), "eval.select", "'last' or 'best'", self.select)
        check(
            self.select == "last" or self.val_every > 0, "eval.val_every",
            "> 0 with eval.select: best (the steps to choose from)", self.val_every,
        )  # fmt: skip
        check(
            self.max_records is None or self.max_records >= 1, "eval.max_records",
            ">= 1 (or null for all)", self.max_records,
        )  # fmt: skip
        check(self.max_new_tokens >= 1, "eval.max_new_tokens", ">= 1", self.max_new_tokens)
        check(self.num_beams >= 1, "eval.num_beams", ">= 1", self.num_beams)
        check(self.itm_k >= 0, "eval.itm_k", ">= 0 (0: no ITM re-ranking)", self.itm_k)


@dataclasses.dataclass
class DeepSpeedSection(Config):
    enabled: bool = False
    config: str = "launch/ds_zero2.json"


@dataclasses.dataclass
class TrainConfig(Config):
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    adapters: dict = dataclasses.field(default_factory=dict)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    sampler: SamplerSection = dataclasses.field(default_factory=SamplerSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    resora: dict | None = None
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    deepspeed: DeepSpeedSection = dataclasses.field(default_factory=DeepSpeedSection)
    paper: dict | None = None  # what the paper reported (recipes); training ignores it

    def adapter_sets(self, where: str = "config") -> dict[str, AdapterSet]:
        """``adapters`` parsed into typed method configs — once: every later caller (placement,
        the DeepSpeed checks, the run's name) gets the same objects, parsed again only if the
        section was changed since."""
        key = json.dumps(self.adapters, sort_keys=True, default=str)
        cached = self.__dict__.get("_adapter_sets")
        if cached is None or cached[0] != key:
            cached = (key, parse_adapter_sets(self.adapters, self.model.family, where))
            self.__dict__["_adapter_sets"] = cached
        return cached[1]


@dataclasses.dataclass(frozen=True)
class AdapterSet:
    """One entry of ``adapters:``, parsed. ``method`` is the method's typed config; its targets
    are the module names the entry gives (``explicit``), else a placeholder until the model
    places the set by its family's ``components`` × ``kinds`` (:func:`launch.run.adapter_methods`).
    """

    method: MethodConfig
    components: list | None = None
    kinds: list | None = None
    route_components: list | None = None
    explicit: bool = False


def parse_adapter_sets(adapters: dict, family_name: str, where: str) -> dict[str, AdapterSet]:
    """Each set's method config and placement, checked against the family (unknown keys,
    components, kinds; targets and a placement together), or a ConfigError naming the set."""
    sets = {}
    for name, spec in adapters.items():
        prefix = f"{where}: adapters.{name}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{prefix}: expected a mapping of method settings")
        placement = {k: spec.get(k) for k in PLACEMENT_KEYS}
        method_spec = {k: v for k, v in spec.items() if k not in placement}
        try:
            if "targets" in spec:
                given = [k for k, v in placement.items() if v is not None]
                if given:
                    raise ConfigError(
                        f"{prefix}: give either targets (module names or a regex) or {given} "
                        "(the family's components × module kinds), not both"
                    )
                method = MethodConfig.from_dict(method_spec, where=prefix)
                sets[name] = AdapterSet(method, explicit=True)
                continue
            method = MethodConfig.from_dict({"targets": ["_"], **method_spec}, where=prefix)
            routed = bool(getattr(method, "routing", None))
            if placement["route_components"] is not None and not routed:
                raise ValueError("route_components needs a routing function (routing: …)")
            family = get_family(family_name)
            family.check_placement(
                placement["components"] or family.default_components,
                placement["kinds"] or family.default_kinds_for(method),
                routed,
                placement["route_components"],
            )
        except KeyError as err:
            raise ConfigError(f"{prefix}: {err.args[0]}") from None
        except (ValueError, TypeError) as err:
            message = str(err)
            raise ConfigError(
                message if message.startswith(prefix) else f"{prefix}: {message}"
            ) from None
        sets[name] = AdapterSet(method, **placement)
    return sets


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["train.steps=50", "model.preset=base"]`` → nested updates (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: {key!r} is not a dotted key (e.g. train.steps)")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except (yaml.YAMLError, RecursionError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"override {item!r}: not a YAML value ({reason})") from None
    return data


def read_json(path: str | Path, error: type[Exception] = RunError) -> Any:
    """A JSON file vlpeft wrote or was given, or a one-line ``error`` naming it
    (:func:`vlpeft.checkpoint.read_json_file`: missing, not a regular file, not UTF-8, malformed,
    nested too deeply)."""
    return read_json_file(path, error)


def check_tasks_fit_model(config: TrainConfig, where: str) -> None:
    """Refuses a task the model cannot serve (e.g. BLIP + NLVR²: BLIP scores no fixed choices),
    naming both. Reads the task readers from ``data.file`` when it exists (otherwise the router
    reports the missing file when the run starts)."""
    path = Path(config.data.file)
    if not path.is_file():
        return
    try:
        entries = load_yaml(path) or {}
        family = get_family(config.model.family)
        model_config = preset_config(
            config.model.family, config.model.preset, **config.model.overrides
        )
    except (DataError, KeyError, ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None
    capabilities = family.capabilities_of(model_config)
    for name, settings in config.data.tasks.items():
        entry = {**(entries.get(name) or {}), **(settings or {})}
        if "reader" not in entry:
            continue  # the router names the missing entry or key
        try:
            task = get_task(entry["reader"])
        except DataError as err:
            raise ConfigError(f"{where}: data.tasks.{name}: {err}") from None
        if not task.serves(capabilities):
            raise ConfigError(
                f"{where}: task {name!r} (reader {task.name}) needs a model that serves "
                f"{task.needs!r}, but model {config.model.family!r} (preset "
                f"{config.model.preset!r}) serves {list(capabilities)}"
            )


def validate(config: TrainConfig, where: str) -> TrainConfig:
    """Checks values that the dataclasses cannot (family, methods, sampler mode, precision) and
    that the model can serve every task."""
    if not config.model.family:
        raise ConfigError(f"{where}: model.family is required")
    try:
        get_family(config.model.family)
        SamplerConfig(**dataclasses.asdict(config.sampler))
    except (KeyError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None
    if not config.data.file:
        raise ConfigError(
            f"{where}: data.file is required (a task-router YAML, e.g. the synthetic set's tasks.yaml)"
        )
    if not config.data.tasks:
        raise ConfigError(f"{where}: data.tasks is empty: name the tasks to train")
    config.adapter_sets(where)
    if config.resora is not None:
        ReSoRAConfig.from_dict(config.resora, f"{where}: resora")
    check_tasks_fit_model(config, where)
    return config


def read_recipe(path: str | Path) -> dict:
    """A config file's mapping (YAML, checked)."""
    path = Path(path)
    if not path.is_file():  # a FIFO or a folder is no config file (and would block or fail)
        raise ConfigError(f"{path}: file not found (or not a regular file)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:  # a python tag included: safe_load refuses it
        reason = " ".join(str(err).split())
        raise ConfigError(
            f"{path}: malformed YAML or a tag safe loading refuses ({reason})"
        ) from None
    except (UnicodeDecodeError, RecursionError) as err:
        raise ConfigError(f"{path}: unreadable YAML ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def stage_names(data: dict, where: str = "config") -> list[str]:
    """The stages of a recipe in run order ([] for a one-stage config), checked: each is a mapping
    of overrides, and a ``train.init_from: stage:<name>`` names an earlier stage."""
    stages = data.get("stages")
    if stages is None:
        return []
    if not isinstance(stages, dict) or not stages:
        raise ConfigError(f"{where}: stages: expected a mapping of stage name → overrides")
    names = list(stages)
    for i, name in enumerate(names):
        if not isinstance(stages[name], dict):
            raise ConfigError(f"{where}: stages.{name}: expected a mapping of overrides")
        source = ((stages[name].get("train") or {}).get("init_from")) or ""
        if isinstance(source, str) and source.startswith(STAGE_PREFIX):
            earlier = source[len(STAGE_PREFIX) :]
            if earlier not in names[:i]:
                raise ConfigError(
                    f"{where}: stages.{name}.train.init_from {source!r}: not an earlier stage "
                    f"(stages in order: {names})"
                )
    return names


def load_config(
    path: str | Path | None,
    overrides: list[str] = (),
    data: dict | None = None,
    stage: str | None = None,
) -> TrainConfig:
    """Reads, overrides and validates a training config (``data`` instead of a file for tests);
    ``stage`` picks one stage of a recipe that lists ``stages``."""
    where = str(path) if path else "config"
    if path is not None:
        path = Path(path)
        data = read_recipe(path)
    data = copy.deepcopy(data or {})
    names = stage_names(data, where)
    stages = data.pop("stages", None)
    if names and stage is None:
        raise ConfigError(
            f"{where}: a recipe of stages {names}: pick one with --stage NAME "
            "(python -m launch.reproduce runs them in order)"
        )
    if stage is not None:
        if stage not in names:
            raise ConfigError(f"{where}: no stage {stage!r}; stages: {names or 'none'}")
        data = deep_merge(data, copy.deepcopy(stages[stage]))
        where = f"{where} (stage {stage})"
    data = apply_overrides(data, list(overrides))
    file = (data.get("data") or {}).get("file")
    if path is not None and isinstance(file, str) and file:
        # relative to the working directory, else to the config's folder (shipped recipes)
        if not Path(file).is_absolute() and not Path(file).exists():
            if (path.parent / file).exists():
                data["data"]["file"] = str(path.parent / file)
    return validate(TrainConfig.from_dict(data, where), where)
