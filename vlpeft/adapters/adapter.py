"""Houlsby et al. (ICML 2019) bottleneck adapter, applied sequentially to a module's output:
y' = y + up(act(down(y))), with ``up`` zero-initialised so injection changes no output.

VL-Adapter (Sung et al., CVPR 2022) puts one after the attention output projection and one after the
second FFN linear of every layer, with bottleneck d/8 (768/8 = 96 for BART-base); the target
suffixes for that recipe on BART are ``["self_attn.out_proj", "encoder_attn.out_proj", "fc2"]``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .base import AdapterModule, register_method
from .lora import RoutableConfig, is_conv1d

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def output_features(module: nn.Module, layer_name: str) -> int:
    """Width of a module's output: a Linear/Conv1D/LayerNorm itself, else its last such submodule."""
    for sub in [module, *reversed(list(module.modules()))]:
        if isinstance(sub, nn.Linear):
            return sub.out_features
        if is_conv1d(sub):
            return sub.weight.shape[1]
        if isinstance(sub, nn.LayerNorm):
            return sub.normalized_shape[-1]
    raise ValueError(
        f"cannot infer the output width of {layer_name!r} ({type(module).__name__}): set AdapterConfig.dim"
    )


@register_method("adapter")
@dataclasses.dataclass
class AdapterConfig(RoutableConfig):
    """Sequential bottleneck adapter.

    Args:
        bottleneck: hidden size m of the adapter; when None, ``dim // reduction_factor``.
        reduction_factor: used when ``bottleneck`` is None (VL-Adapter: 8).
        activation: one of relu, gelu, silu, tanh, identity.
        dim: output width of the target module; inferred from Linear/Conv1D/LayerNorm when None.
        routing, separate_mapping, visual_dim: see :class:`~vlpeft.adapters.lora.RoutableConfig`;
            routing acts on the down-projections before the activation.
    """

    bottleneck: int | None = None
    reduction_factor: int = 8
    activation: str = "relu"
    dim: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"AdapterConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.bottleneck is not None and self.bottleneck < 1:
            raise ValueError(f"AdapterConfig.bottleneck must be >= 1, got {self.bottleneck}")
        if self.reduction_factor < 1:
            raise ValueError(
                f"AdapterConfig.reduction_factor must be >= 1, got {self.reduction_factor}"
            )

    def build(self, base_layer: nn.Module, layer_name: str) -> AdapterModule:
        dim = self.dim or output_features(base_layer, layer_name)
        bottleneck = self.bottleneck or max(1, dim // self.reduction_factor)
        weight = next(base_layer.parameters(), None)
        kw = {"dtype": weight.dtype, "device": weight.device} if weight is not None else {}
        if self.routing:
            from .routing import RoutedBottleneckAdapter

            return RoutedBottleneckAdapter(dim, bottleneck, self.activation, self, layer_name, **kw)
        return BottleneckAdapter(dim, bottleneck, self.activation, **kw)


class BottleneckAdapter(AdapterModule):
    """x + up(act(down(x))) on the base output; not mergeable (the activation is nonlinear)."""

    mergeable = False

    def __init__(self, dim: int, bottleneck: int, activation: str, **kw) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, **kw)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim, **kw)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def rank(self) -> int:
        return self.down.out_features

    def bottleneck_activations(self, y: torch.Tensor) -> torch.Tensor:
        return self.act(self.down(y))

    def forward(self, base_layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.bottleneck_activations(y)
        self.record_components(h, self.up.weight)
        return y + self.up(h)
