"""FLoRA (Si et al., "FLoRA: Low-Rank Core Space for N-dimension"): Tucker-factorised updates.

Eq. (5): W0 → W0 + s·ΔW with ΔW = G ×₁ A⁽¹⁾ ×₂ … ×_N A⁽ᴺ⁾, core G zero-initialised and the factor
matrices kaiming-normal (a=√3), so injection changes no output.

- Linear (Eq. 7), written in the weight's (out, in) layout: ΔW = s·A_out·Gᵀ·A_inᵀ with A_in (d_in ×
  r_in), G (r_in × r_out), A_out (d_out × r_out). The forward is the chain x·A_in·G·A_outᵀ through the
  small core; the dense ΔW is never formed. It is a rank-r_out LoRA (A = Gᵀ·A_inᵀ, B = s·A_out), so it
  merges and exports to peft.
- Conv2d (Eq. 6): ΔW = s·einsum('abcd,ia,ob,hc,wd->oihw', G, A_in, A_out, A_kh, A_kw) with A_in of
  size (in_channels // groups) × r_in, which makes grouped and depthwise convolutions work (the
  official code sizes it in_channels and fails there). The forward convolves with ΔW using the base
  layer's stride, padding, dilation, groups and padding mode.

FLoRA-linear takes a routing function (Qu et al. 2024, composed as for every bottleneck method): its
bottleneck z = x·A_in·G is routed with z_v = x_R·A_in·G (or x_R·A_in,v·G with a separate trainable
A_in,v, kaiming-normal like A_in); the branch is s·route(z, z_v)·A_outᵀ and starts at zero (G = 0).
A routed FLoRA is neither mergeable nor exported to peft. Routing needs a bottleneck of tokens, so a
routed FLoRA on a Conv2d is an error.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdaptedLayer, AdapterModule, is_conv1d, linear_shape, register_method
from .routing import RoutableConfig, make_routing


@register_method("flora")
@dataclasses.dataclass
class FLoRAConfig(RoutableConfig):
    """FLoRA.

    Args:
        r: rank of the input and output modes (r₁ = r₂, as in the paper's experiments).
        scale: the constant s (the paper picks from {0.04, 0.4, 4} per backbone).
        r_in: input-mode rank, overriding ``r``.
        r_out: output-mode rank, overriding ``r``.
        r_kernel: rank of each kernel mode of a conv (r₃ ∈ {1, 2} for 3×3 kernels), clipped to the kernel size.
        routing, separate_mapping, visual_dim: see :class:`~vlpeft.adapters.routing.RoutableConfig`
            (linear layers only).
    """

    r: int = 8
    scale: float = 1.0
    r_in: int | None = None
    r_out: int | None = None
    r_kernel: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("r", "r_in", "r_out", "r_kernel"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ValueError(f"FLoRAConfig.{field} must be >= 1, got {value}")

    def build(self, base_layer: nn.Module, layer_name: str) -> AdapterModule:
        if isinstance(base_layer, nn.Conv2d):
            if self.routing:
                raise TypeError(f"{layer_name}: routed FLoRA supports Linear and Conv1D layers")
            return FLoRAConv2d(base_layer, self)
        if isinstance(base_layer, nn.Linear) or is_conv1d(base_layer):
            return FLoRALinear(base_layer, self, layer_name)
        raise TypeError(
            f"FLoRA target {layer_name!r} is a {type(base_layer).__name__}; it supports nn.Linear, Conv1D and nn.Conv2d"
        )


def _factor(rows: int, cols: int, **kw) -> nn.Parameter:
    weight = torch.empty(rows, cols, **kw)
    nn.init.kaiming_normal_(weight, a=math.sqrt(3))
    return nn.Parameter(weight)


class FLoRALinear(AdapterModule):
    """FLoRA on a Linear or Conv1D: y + s·((x·A_in)·G)·A_outᵀ."""

    mergeable = True
    lora_reducible = True

    def __init__(self, base: nn.Module, config: FLoRAConfig, layer_name: str = "") -> None:
        super().__init__()
        d_in, d_out = linear_shape(base)
        r_in, r_out = config.r_in or config.r, config.r_out or config.r
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.a_in = _factor(d_in, r_in, **kw)
        self.a_out = _factor(d_out, r_out, **kw)
        self.core = nn.Parameter(torch.zeros(r_in, r_out, **kw))
        self.s = config.scale
        self.routing = make_routing(config, layer_name, d_in)
        self.a_in_visual = None
        if self.routing is not None:
            self.mergeable = self.lora_reducible = False
            if self.routing.separate:
                self.a_in_visual = _factor(self.routing.visual_dim, r_in, **kw)

    @property
    def rank(self) -> int:
        return self.core.shape[1]

    def visual_bottleneck(self, x_r: torch.Tensor) -> torch.Tensor:
        a_in = self.a_in if self.a_in_visual is None else self.a_in_visual
        return (x_r @ a_in) @ self.core

    def forward(
        self, base_layer: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer
    ) -> torch.Tensor:
        z = (x @ self.a_in) @ self.core
        if self.routing is not None:
            z = self.routing(z, layer, self.visual_bottleneck)
        b = self.a_out * self.s
        layer.record(self, z, b)
        return y + F.linear(z, b).to(y.dtype)

    def lora_factors(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.a_in @ self.core).T, self.a_out * self.s


class FLoRAConv2d(AdapterModule):
    """FLoRA on a Conv2d (grouped and depthwise included): y + conv(x, s·G ×₁ A_in ×₂ A_out ×₃ A_kh ×₄ A_kw).
    Its update is a Tucker core, not a sum of rank-1 components: ReSoRA refuses it."""

    mergeable = True
    records = False

    def __init__(self, base: nn.Conv2d, config: FLoRAConfig) -> None:
        super().__init__()
        c_in = base.in_channels // base.groups
        kh, kw_ = base.kernel_size
        r_in, r_out = (
            min(config.r_in or config.r, c_in),
            min(config.r_out or config.r, base.out_channels),
        )
        r_h, r_w = min(config.r_kernel, kh), min(config.r_kernel, kw_)
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.a_in = _factor(c_in, r_in, **kw)
        self.a_out = _factor(base.out_channels, r_out, **kw)
        self.a_kh = _factor(kh, r_h, **kw)
        self.a_kw = _factor(kw_, r_w, **kw)
        self.core = nn.Parameter(torch.zeros(r_in, r_out, r_h, r_w, **kw))
        self.s = config.scale

    @property
    def rank(self) -> int:
        return self.core.shape[1]

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return self.s * torch.einsum(
            "abcd,ia,ob,hc,wd->oihw", self.core, self.a_in, self.a_out, self.a_kh, self.a_kw
        )

    def weight_components(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("FLoRA on a Conv2d has no rank-1 weight components (a Tucker core)")

    def forward(
        self, base_layer: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer
    ) -> torch.Tensor:
        return y + base_layer._conv_forward(x, self.delta_weight(base_layer), None).to(y.dtype)
