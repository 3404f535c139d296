"""Injecting named adapters into any ``nn.Module``, switching, merging and counting them.

Example:
    >>> import torch, vlpeft
    >>> from vlpeft.adapters import LoRAConfig
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> _ = vlpeft.add_adapter(net, LoRAConfig(targets=["0", "2"], r=2))
    >>> vlpeft.count_parameters(net)
    (28, 58)
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence

from torch import nn

from .adapters.base import (
    AdaptedLayer,
    MethodConfig,
    adapted_layers,
    adapter_configs,
    matches_targets,
)
from .adapters.resora import recorder_of

__all__ = [
    "active_adapters",
    "adapted_layers",
    "adapter_configs",
    "add_adapter",
    "count_parameters",
    "find_targets",
    "freeze_except_adapters",
    "merge_adapter",
    "set_active_adapter",
    "trainable_extra_names",
    "unmerge_adapter",
]


def _candidate_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every module a target may name: adapted layers count under their own name, their insides not."""
    skip: list[str] = []
    for path, sub in module.named_modules():
        if not path or any(path.startswith(prefix) for prefix in skip):
            continue
        if isinstance(sub, AdaptedLayer):
            skip.append(path + ".")
        yield path, sub


def find_targets(module: nn.Module, targets: list[str] | str) -> list[tuple[str, nn.Module]]:
    """Modules named by ``targets``; nothing found is an error that lists the closest names."""
    candidates = list(_candidate_modules(module))
    found = [(path, sub) for path, sub in candidates if matches_targets(path, targets)]
    if not found:
        names = [path for path, _ in candidates]
        leaves = sorted({path.rsplit(".", 1)[-1] for path in names})
        wanted = [targets] if isinstance(targets, str) else targets
        close = sorted(
            {
                c
                for t in wanted
                for c in difflib.get_close_matches(t, leaves + names, n=4, cutoff=0.4)
            }
        )
        raise ValueError(
            f"targets {targets!r} match no module of {type(module).__name__}; "
            f"closest names: {close or leaves[:12]}"
        )
    return found


def add_adapter(module: nn.Module, config: MethodConfig, name: str = "default") -> nn.Module:
    """Injects adapter ``name`` of ``config``'s method into the target layers of ``module``.

    Every parameter outside the adapters and the config's ``trainable`` patterns is frozen. The
    first adapter added becomes the active one; switch with :func:`set_active_adapter`.

    Args:
        module: any ``nn.Module`` (a VL model, a bare transformers or open_clip model).
        config: a method config (``LoRAConfig``, ``AdapterConfig``, ...).
        name: adapter name, e.g. a task; several names can live in one model.

    Returns:
        ``module``, modified in place.
    """
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"adapter name {name!r} must be letters, digits, '_' or '-'")
    configs = adapter_configs(module)
    if name in configs:
        raise ValueError(
            f"adapter {name!r} already exists in this module; names in use: {sorted(configs)}"
        )
    recorder = recorder_of(module)  # adapters added after enable_resora join its recorder
    targets = find_targets(module, config.targets)
    built = {  # every adapter is built (and checked) before the module is touched
        path: config.build(sub.base_layer if isinstance(sub, AdaptedLayer) else sub, path)
        for path, sub in targets
    }
    config.after_injection(built)
    for path, sub in targets:
        layer = sub if isinstance(sub, AdaptedLayer) else AdaptedLayer(sub, path)
        layer.adapters[name] = built[path]
        if layer is not sub:
            layer.recorder = recorder
            module.set_submodule(path, layer)
    configs[name] = config
    freeze_except_adapters(module)
    if not any(layer.active for _, layer in adapted_layers(module)):
        set_active_adapter(module, name)
    return module


def trainable_extra_names(module: nn.Module, config: MethodConfig) -> list[str]:
    """Names of the non-adapter parameters that ``config.trainable`` declares trainable."""
    names = [n for n, _ in module.named_parameters() if ".adapters." not in n]
    out = []
    for pattern in config.trainable:
        hits = [n for n in names if re.search(pattern, n)]
        if not hits:
            close = difflib.get_close_matches(pattern, names, n=4, cutoff=0.3)
            raise ValueError(
                f"trainable pattern {pattern!r} matches no parameter; closest names: {close}"
            )
        out.extend(h for h in hits if h not in out)
    return out


def freeze_except_adapters(module: nn.Module) -> None:
    """Freezes everything but adapter parameters and the declared ``trainable`` ones of every config."""
    extra = {
        n for cfg in adapter_configs(module).values() for n in trainable_extra_names(module, cfg)
    }
    for n, p in module.named_parameters():
        if ".adapters." not in n:
            p.requires_grad_(n in extra)


def set_active_adapter(module: nn.Module, name: str | Sequence[str] | None) -> None:
    """Makes ``name`` (or several names, applied in order; None: none) the adapters used in the forward."""
    names = () if name is None else (name,) if isinstance(name, str) else tuple(name)
    known = adapter_configs(module)
    for n in names:
        if n not in known:
            raise KeyError(f"no adapter named {n!r}; this module has {sorted(known)}")
    for path, layer in adapted_layers(module):
        if layer.merged:
            raise RuntimeError(
                f"{path}: adapters {list(layer.merged)} are merged; unmerge_adapter first"
            )
        layer.active = names


def active_adapters(module: nn.Module) -> tuple[str, ...]:
    """The names currently active (as set by :func:`set_active_adapter`)."""
    for _, layer in adapted_layers(module):
        return layer.active
    return ()


def merge_adapter(module: nn.Module) -> None:
    """Folds the active adapters' ΔW into the base weights (a clear error for non-mergeable methods)."""
    layers = list(adapted_layers(module))
    for path, layer in layers:
        for n in layer.active:
            if n in layer.adapters and not layer.adapters[n].mergeable:
                method = adapter_configs(module)[n].method
                raise TypeError(
                    f"adapter {n!r} ({method}) at {path} is not mergeable: its output is not W0 + ΔW "
                    "for a fixed ΔW"
                )
    for _, layer in layers:
        layer.merge()


def unmerge_adapter(module: nn.Module) -> None:
    """Subtracts every merged ΔW again, restoring the base weights (up to float rounding)."""
    for _, layer in adapted_layers(module):
        layer.unmerge()


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
