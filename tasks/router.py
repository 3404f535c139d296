"""The task router: each task's reader, prompt, batches, adapter set and routing function.

Configured in YAML (``tasks:`` of the training config, or the ``tasks.yaml`` the synthetic set
writes): one entry per task, the fields of :class:`tasks.base.TaskConfig`; ``reader`` names a
registered task (:func:`tasks.base.list_tasks`: every task file of the package). Relative paths —
``root``, ``images``, ``features`` and the options a task names in ``path_options`` — are resolved
against the YAML file's folder. ``adapter`` names the adapter set the task trains (the same name
for several tasks = shared); ``routing`` switches the routing function of the active routed
adapters when the task is activated (the per-task combinations of Qu et al.).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml

import vlpeft
from vlpeft.adapters.routing import set_routing

from .base import (
    DataError,
    DataLoader,
    Task,
    TaskConfig,
    TaskDataset,
    get_task,
    image_transform,
    read_text,
)
from .features import FeatureCache, builder_of

CACHE_FOLDER = ".vlpeft_cache"  # the record cache's default place: beside the router YAML


def load_yaml(path: str | Path) -> Any:
    """A task-router YAML's content (plain values only), or a one-line DataError naming the file:
    missing, not a regular file, not UTF-8, malformed, nested too deeply, or holding a tag —
    ``!!python/…`` and any other: safe loading builds no objects, and says so here in one line."""
    text = read_text(path)
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        problem = " ".join(p for p in (err.context, err.problem) if p)
        if "constructor for the tag" in problem:
            problem += " (a task YAML holds plain mappings, lists, strings and numbers: no tags)"
        raise DataError(f"{path}: malformed YAML at {at}{problem}") from None
    except yaml.YAMLError as err:
        raise DataError(f"{path}: malformed YAML ({' '.join(str(err).split())})") from None
    except RecursionError:
        raise DataError(f"{path}: YAML nested too deeply to read") from None


# a task's name becomes part of file names (eval/<task>.json, submissions): a plain name only
TASK_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def check_task_name(name: Any, where: str) -> str:
    """``name`` when it is a plain task name (letters, digits, ``_``, ``-``, ``.``, not starting
    with ``.``); anything that could leave a folder (``../x``, ``a/b``, an absolute path) is a
    DataError naming the key."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise DataError(
            f"{where}: task name {name!r} is not a plain name (letters, digits, '_', '-', '.', "
            "not starting with '.'): it names files of the run"
        )
    return name


def resolve_paths(options: dict, path_options, base: Path) -> dict:
    """``options`` with those named in ``path_options`` (a task's) resolved against ``base``."""
    return {k: str(base / v) if k in path_options else v for k, v in options.items()}


class TaskRouter:
    """Tasks by name, built from their configs.

    Example:
        >>> router = TaskRouter.from_yaml("data/tasks.yaml", only=["vqa", "nlvr2"])
        >>> router.activate(model, "vqa")
        >>> loader = router.loader("vqa", "val", model)
    """

    def __init__(self, configs: dict[str, TaskConfig], cache_dir: str | Path | None = None) -> None:
        if not configs:
            raise DataError("task router: no tasks configured")
        for name in configs:
            check_task_name(name, "task router")
        self.configs = configs
        self.tasks: dict[str, Task] = {
            name: get_task(cfg.reader)(cfg) for name, cfg in configs.items()
        }
        for name, task in self.tasks.items():
            task.config_name = name
            task.cache_dir = Path(cache_dir) if cache_dir else None

    @classmethod
    def from_dict(
        cls, data: dict, base_dir: str | Path = ".", only=None, where: str = "tasks",
        cache_dir: str | Path | None = None,
    ) -> TaskRouter:  # fmt: skip
        """The tasks of ``data`` (name → settings) with paths relative to ``base_dir``; their
        parsed splits are cached in ``cache_dir`` (:mod:`tasks.records`; None: not cached)."""
        if not isinstance(data, dict):
            raise DataError(f"{where}: expected a mapping of task name → settings")
        if only is not None:
            unknown = [t for t in only if t not in data]
            if unknown:
                raise DataError(f"{where}: unknown task(s) {unknown}; configured: {sorted(data)}")
            data = {t: data[t] for t in only}
        base = Path(base_dir)
        configs = {}
        for name, entry in data.items():
            check_task_name(name, f"{where}: key {name!r}")
            config = TaskConfig.from_dict(dict(entry), f"{where}.{name}")
            config.root = str(base / config.root)
            config.images = str(base / config.images) if config.images else ""
            config.features = str(base / config.features) if config.features else None
            task = get_task(config.reader)  # an unknown reader fails here, naming the task
            config.options = resolve_paths(config.options, task.path_options, base)
            configs[name] = config
        return cls(configs, cache_dir)

    @classmethod
    def from_yaml(
        cls, path: str | Path, only=None, cache_dir: str | Path | bool = True
    ) -> TaskRouter:
        """The tasks of a router YAML; ``cache_dir`` True: the record cache in
        ``<its folder>/.vlpeft_cache``, a path: there, False/None: no cache."""
        if cache_dir is True:
            cache_dir = Path(path).parent / CACHE_FOLDER
        return cls.from_dict(
            load_yaml(path), Path(path).parent, only, where=str(path), cache_dir=cache_dir or None
        )

    def __getitem__(self, name: str) -> Task:
        if name not in self.tasks:
            raise DataError(f"unknown task {name!r}; configured: {sorted(self.tasks)}")
        return self.tasks[name]

    def adapter_sets(self) -> dict[str, list[str]]:
        """Adapter set name → the tasks that train it."""
        sets: dict[str, list[str]] = {}
        for name, config in self.configs.items():
            sets.setdefault(config.adapter, []).append(name)
        return sets

    def activate(self, model: torch.nn.Module, name: str) -> None:
        """Makes ``name``'s adapter set active and applies its routing function."""
        config = self[name].config
        if any(True for _ in vlpeft.adapted_layers(model)):
            vlpeft.set_active_adapter(model, config.adapter)
            set_routing(model, config.routing)  # None: the set's configured function

    def dataset(
        self, name: str, split: str, model, features: dict | None = None, limit: int | None = None
    ) -> TaskDataset:
        """``split`` of task ``name`` preprocessed for ``model``; images come from ``features`` (a
        mapping or :class:`tasks.features.FeatureCache`) or, when the task names a cache folder
        (``features:``), from that cache, checked to be ``model``'s."""
        task = self[name]
        cfg = model.config
        transform = image_transform(cfg.image_size, cfg.image_mean, cfg.image_std)
        if features is None and task.config.features:
            features = FeatureCache(task.config.features, builder_of(model))
        return TaskDataset(task, task.read(split, limit), transform, features)

    def loader(
        self, name: str, split: str, model, features: dict | None = None, limit: int | None = None
    ) -> torch.utils.data.DataLoader:
        """An evaluation loader over ``split`` in file order (``eval_batch_size``)."""
        dataset = self.dataset(name, split, model, features, limit)
        return DataLoader(
            dataset, batch_size=self[name].config.eval_batch_size, collate_fn=dataset.collate
        )


def take(dataset: TaskDataset, indices: list[int]) -> dict[str, Any]:
    """The collated batch of ``dataset[indices]`` (what a sampler step trains on)."""
    return dataset.collate([dataset[i] for i in indices])
