"""A rank-based method with a rank and an alpha per layer (method ``layerwise``).

What a peft ``rank_pattern``/``alpha_pattern`` describes (:func:`vlpeft.load_peft_lora` builds one
when a checkpoint's layers differ) and what a merge at per-layer ranks gives
(:func:`vlpeft.merge_task_adapters`). It wraps the config of a method whose class sets
``layerwise_rank`` (LoRA, DoRA) and builds each layer with that layer's ``r`` and ``alpha``; it saves
and reloads like every method.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .base import METHODS, AdapterModule, MethodConfig, register_method


def layerwise_methods() -> list[str]:
    """The registered methods whose config has a per-layer ``r`` and ``alpha``."""
    return [name for name, cls in METHODS.items() if cls.layerwise_rank]


@register_method("layerwise")
@dataclasses.dataclass
class LayerwiseConfig(MethodConfig):
    """A rank-based method (``lora`` or ``dora``) with a rank and an alpha per layer.

    Args:
        base: the method's config as a dict (``{"method": "lora", "r": 8, "alpha": 8, ...}``):
            everything but the per-layer rank and alpha.
        ranks: exact layer name → rank (layers not named take ``base``'s r).
        alphas: exact layer name → alpha (layers not named take ``base``'s alpha).
        targets: the exact layer names (a list; matched as names or dotted suffixes).

    Example:
        >>> import torch, vlpeft
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> cfg = LayerwiseConfig(targets=["0", "1"], base={"method": "lora", "r": 2},
        ...                       ranks={"1": 1}, alphas={"1": 4.0})
        >>> _ = vlpeft.add_adapter(net, cfg)
        >>> net[1].adapters["default"].lora_A.shape, net[1].adapters["default"].scaling
        (torch.Size([1, 4]), 4.0)
    """

    base: dict[str, Any] = dataclasses.field(default_factory=dict)
    ranks: dict[str, int] = dataclasses.field(default_factory=dict)
    alphas: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        method = self.base.get("method") if isinstance(self.base, dict) else None
        if method not in layerwise_methods():
            names = " or ".join(repr(n) for n in layerwise_methods())
            raise ValueError(
                f"LayerwiseConfig.base must be a {names} config dict, got "
                f"{method if isinstance(self.base, dict) else self.base!r}"
            )
        for key, value in self.ranks.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"LayerwiseConfig.ranks[{key!r}] must be an int >= 1, got {value!r}"
                )
        for key, value in self.alphas.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"LayerwiseConfig.alphas[{key!r}] must be a number, got {value!r}")
        base = dict(self.base)
        base.setdefault("targets", list(self.targets))
        self._inner = MethodConfig.from_dict(base, where="LayerwiseConfig.base")

    def layer_config(self, layer_name: str) -> MethodConfig:
        """The method config of one layer: the base with that layer's rank and alpha."""
        inner = self._inner
        r = self.ranks.get(layer_name, inner.r)
        alpha = float(self.alphas.get(layer_name, inner.alpha))
        return dataclasses.replace(inner, r=r, alpha=alpha)

    def build(self, base_layer: nn.Module, layer_name: str) -> AdapterModule:
        return self.layer_config(layer_name).build(base_layer, layer_name)

    def deepspeed_problem(self, zero_stage: int) -> str | None:
        return self._inner.deepspeed_problem(zero_stage)
