"""peft's ``PeftModel`` verbs for taking adapters out again: merge-and-unload, unload, delete.

- :func:`merge_and_unload`: the update of the active (or named) adapters folded into the base
  weights and every :class:`~vlpeft.adapters.base.AdaptedLayer` replaced by its base layer — the
  plain model, whose ``state_dict`` has the original names, so a transformers backbone inside it
  round-trips through ``save_pretrained`` / ``from_pretrained`` with the adapted outputs.
- :func:`unload`: the wrappers replaced by their base layers, weights left as they are (the
  original model back, as peft's ``unload``; an adapter merged before stays in the weights).
- :func:`delete_adapter`: one adapter gone from every layer (a layer left with none is unwrapped),
  the others kept.

Example:
    >>> import torch, vlpeft
    >>> from vlpeft.adapters import LoRAConfig
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> _ = vlpeft.add_adapter(net, LoRAConfig(targets=["0"], r=2))
    >>> net = vlpeft.merge_and_unload(net)
    >>> type(net[0]).__name__, list(vlpeft.adapted_layers(net))
    ('Linear', [])
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from .adapters.base import AdaptedLayer, adapted_layers, adapter_configs, gathered
from .inject import freeze_except_adapters

log = logging.getLogger(__name__)

__all__ = ["delete_adapter", "merge_and_unload", "unload"]


def merge_and_unload(
    module: nn.Module, adapter_names: Sequence[str] | None = None, safe_merge: bool = False
) -> nn.Module:
    """Folds adapters into the base weights and removes every adapter layer, as peft's
    ``PeftModel.merge_and_unload``.

    Args:
        module: the model holding the adapters (a VL model or a bare backbone).
        adapter_names: the adapters to merge (default: the active ones; adapters already merged
            with :func:`vlpeft.merge_adapter` stay merged). Every other adapter is dropped.
        safe_merge: check every merged weight for NaN/inf (peft's ``safe_merge``); a broken one
            is a ValueError naming the adapter and layer, with every merge of this call undone.

    Returns:
        ``module``, modified in place: plain layers with W0 + ΔW, no adapters left. A method whose
        output is not W0 + ΔW for a fixed ΔW (Adapter, a routed adapter) is refused, naming the
        adapter, its layer and why, before anything changes.

    Example:
        >>> model = vlpeft.merge_and_unload(model)  # doctest: +SKIP
        >>> model.bart.save_pretrained("merged_bart/")  # doctest: +SKIP
    """
    configs = adapter_configs(module)
    names = _active(module) if adapter_names is None else list(adapter_names)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(
            f"adapter {unknown[0]!r} does not exist; this module has {sorted(configs)}"
        )
    layers = list(adapted_layers(module))
    for path, layer in layers:
        for n in names:
            adapter = layer.adapters[n] if n in layer.adapters else None
            if adapter is not None and not adapter.mergeable and n not in layer.merged:
                raise TypeError(f"adapter {n!r} ({configs[n].method}) at {path}: {_why(adapter)}")
    done: list[tuple[AdaptedLayer, str, torch.Tensor | None]] = []
    with gathered(module.parameters(), modifier_rank=0), torch.no_grad():
        for path, layer in layers:
            for n in names:
                if n in layer.adapters and n not in layer.merged:
                    weight = layer.base_layer.weight
                    done.append((layer, n, weight.clone() if safe_merge else None))
                    layer.adapters[n].merge_into(layer.base_layer)
                    layer.merged = (*layer.merged, n)
                    if safe_merge and not torch.isfinite(weight).all():
                        _undo(done)
                        raise ValueError(
                            f"adapter {n!r} at {path}: NaN or inf in the merged weight (the "
                            "adapter seems broken); nothing was merged"
                        )
    return unload(module)


def _undo(done: list) -> None:
    """Unmerges (the methods' own bookkeeping) and puts back the weights as they were."""
    for layer, n, weight in reversed(done):
        layer.adapters[n].unmerge_from(layer.base_layer)
        layer.base_layer.weight.copy_(weight)
        layer.merged = tuple(m for m in layer.merged if m != n)


def _why(adapter) -> str:
    if adapter.routing is not None:
        return "routed: its update depends on x_R, so there is no fixed ΔW to fold into W0"
    return "not mergeable: its output is not W0 + ΔW for a fixed ΔW (a nonlinear bottleneck)"


def _active(module: nn.Module) -> list[str]:
    """The active names of any layer, in order (a layer added later may not list them)."""
    names: dict[str, None] = {}
    for _, layer in adapted_layers(module):
        names.update(dict.fromkeys(layer.active))
    return list(names)


def unload(module: nn.Module) -> nn.Module:
    """Replaces every adapter layer by its base layer, weights untouched, and forgets the adapters
    (as peft's ``unload``: a merged adapter stays in the weights — :func:`vlpeft.unmerge_adapter`
    first for W0). Every parameter is left frozen but the declared-trainable ones, as before.

    Returns:
        ``module``, modified in place.
    """
    for path, layer in list(adapted_layers(module)):
        _replace(module, path, layer)
    adapter_configs(module).clear()
    return module


def _replace(module: nn.Module, path: str, layer: AdaptedLayer) -> None:
    if path:
        module.set_submodule(path, layer.base_layer)
    else:
        raise ValueError("the module itself is an adapter layer: use its .base_layer")


def delete_adapter(module: nn.Module, name: str) -> nn.Module:
    """Removes adapter ``name`` from every layer and from the module's configs, as peft's
    ``delete_adapter``; the other adapters are kept, and a layer left without adapters is
    replaced by its base layer.

    An unknown name, or a merged adapter (:func:`vlpeft.unmerge_adapter` first), is a ValueError.
    Deleting an active adapter leaves the other active ones active; when none is left, the first
    remaining adapter becomes active with a warning (as peft), or none when no adapter is left.
    Parameters only the deleted adapter declared trainable are frozen again.

    Returns:
        ``module``, modified in place.
    """
    configs = adapter_configs(module)
    if name not in configs:
        raise ValueError(f"adapter {name!r} does not exist; this module has {sorted(configs)}")
    layers = list(adapted_layers(module))
    merged = [path for path, layer in layers if name in layer.merged]
    if merged:
        raise ValueError(
            f"adapter {name!r} is merged into {merged[0]} ({len(merged)} layers): "
            "unmerge_adapter before deleting it"
        )
    del configs[name]
    active = tuple(n for n in _active(module) if n != name)
    if name in _active(module) and not active and configs:
        active = (next(iter(configs)),)  # nothing is merged: merged adapters are active ones
        log.warning(
            "adapter %r was active and is deleted; %r is now the active adapter", name, active[0]
        )
    for path, layer in layers:
        if name in layer.adapters:
            del layer.adapters[name]
        layer.active = active
        if not len(layer.adapters):
            _replace(module, path, layer)
    freeze_except_adapters(module)
    return module
