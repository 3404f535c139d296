"""Houlsby et al. (ICML 2019) bottleneck adapter, applied sequentially to a module's output:
y' = y + up(act(down(y))), with ``up`` zero-initialised so injection changes no output.

VL-Adapter (Sung et al., CVPR 2022) puts one after the attention output projection and one after the
second FFN linear of every layer, with bottleneck d/8 (768/8 = 96 for BART-base); the target
suffixes for that recipe on BART are ``["self_attn.out_proj", "encoder_attn.out_proj", "fc2"]``.

With ``routing`` (Qu et al. 2024) the down-projections of y and x_R (bias included) are routed
before the activation: y + up(act(route(down(y), down(x_R)))).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from .base import AdaptedLayer, AdapterModule, factory_kwargs, is_conv1d, register_method
from .routing import RoutableConfig, make_routing

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
        routing, separate_mapping, visual_dim: see :class:`~vlpeft.adapters.routing.RoutableConfig`;
            routing acts on the down-projections before the activation.
    """

    placement: ClassVar[str] = "adapter"  # after the attention output and the second FFN linear

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
        return BottleneckAdapter(
            dim, bottleneck, self.activation, make_routing(self, layer_name, dim),
            **factory_kwargs(base_layer),
        )  # fmt: skip


class BottleneckAdapter(AdapterModule):
    """y + up(act(down(y))) on the base output; not mergeable (the activation is nonlinear).
    ``down_visual`` is the separate mapping of x_R of a routed adapter that has one."""

    mergeable = False

    def __init__(self, dim: int, bottleneck: int, activation: str, routing=None, **kw) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, **kw)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim, **kw)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.routing = routing
        self.down_visual = None
        if routing is not None and routing.separate:
            self.down_visual = nn.Linear(routing.visual_dim, bottleneck, **kw)

    @property
    def rank(self) -> int:
        return self.down.out_features

    def visual_bottleneck(self, x_r: torch.Tensor) -> torch.Tensor:
        return (self.down_visual or self.down)(x_r)

    def bottleneck_activations(self, y: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        h = self.down(y)
        if self.routing is not None:
            h = self.routing(h, layer, self.visual_bottleneck)
        return self.act(h)

    def forward(
        self, base_layer: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer
    ) -> torch.Tensor:
        h = self.bottleneck_activations(y, layer)
        layer.record(self, h, self.up.weight)
        return y + self.up(h)

    def weight_components(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return self.down.weight.T, self.up.weight
