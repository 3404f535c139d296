"""DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024): the weight is split
into a magnitude and a direction, the direction gets a LoRA update (Eq. 5):

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖,     s = α / r,

with the norm taken **per output feature** — over each row of W in the (out, in) layout, over
(in, kh, kw) of each output channel of a Conv2d — which is the paper's column-wise ‖·‖_c of its
(d × k) V (one magnitude per output of the layer) and exactly peft's ``use_dora=True``. The
magnitude m (one trainable value per output) starts as ‖W0‖ and B as zeros, so injection changes no
output; A is kaiming-uniform as in LoRA.

**The norm is detached** (Sec. 4.3, "we suggest treating ‖V + ΔV‖_c in Eq. 5 as a constant,
thereby detaching it from the gradient graph"): it follows the current A, B in every forward but
receives no gradient, which saves the memory of its backward. peft does the same, so outputs and
gradients match peft's DoRA (tests/test_dora.py).

The forward never forms W': with y = W0·x + b the layer's output and ℓ = s·B·A·x,

    y' = y + (m/n − 1)·(y − b) + (m/n)·ℓ

(peft's formula; with dropout in training, W0·x in the second term is W0·dropout(x), as in peft,
so the whole change sees the dropped input). With several active adapters a DoRA rescales what the
adapters before it produced, as in peft.

DoRA is mergeable: W' is folded into the base weight; since ΔW = W' − W0 depends on W0, merging
keeps the norm n it used (one vector per layer) so that unmerging restores W0. It is not a plain
LoRA (ΔW = (m/n − 1)⊙W0 + (m/n)⊙s·B·A is full-rank): the peft export writes it with
``use_dora: true`` (:meth:`DoRALinear.peft_tensors`). Supported base layers: ``nn.Linear``,
transformers' ``Conv1D`` and ``nn.Conv2d`` (groups = 1, zero padding), as LoRA's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    AdaptedLayer,
    AdapterModule,
    MethodConfig,
    gathered,
    is_conv1d,
    linear_shape,
    register_method,
)


@register_method("dora")
@dataclasses.dataclass
class DoRAConfig(MethodConfig):
    """DoRA (Liu et al. 2024, Eq. 5); Null-LoRA's Tables 1–2 baseline (r = 32).

    Args:
        r: rank of the directional update B·A.
        alpha: scaling numerator, the update is (alpha / r)·B·A. None (default): α = r, as LoRA's.
        dropout: dropout probability on the adapter's input (training only).

    Example:
        >>> import torch, vlpeft
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> _ = vlpeft.add_adapter(net, DoRAConfig(targets=["0"], r=2))
        >>> net[0].adapters["default"].magnitude.shape
        torch.Size([3])
    """

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0

    layerwise_rank: ClassVar[bool] = True
    peft_flags: ClassVar[dict[str, Any] | None] = {"use_dora": True}
    peft_layer_tensors: ClassVar[dict[str, str]] = {
        "lora_A.weight": "lora_A",
        "lora_B.weight": "lora_B",
        "lora_magnitude_vector": "magnitude",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1:
            raise ValueError(f"DoRAConfig.r must be >= 1, got {self.r}")
        if self.alpha is None:
            self.alpha = float(self.r)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DoRAConfig.dropout must be in [0, 1), got {self.dropout}")

    def deepspeed_problem(self, zero_stage: int) -> str | None:
        if zero_stage == 3:
            return (
                "ZeRO-3 partitions the base weights, and DoRA reads the whole W0 at every forward "
                "for its norm: use ZeRO-2"
            )
        return None

    def build(self, base_layer: nn.Module, layer_name: str) -> AdapterModule:
        if isinstance(base_layer, nn.Conv2d):
            return DoRAConv2d(base_layer, self, layer_name)
        if isinstance(base_layer, nn.Linear) or is_conv1d(base_layer):
            return DoRALinear(base_layer, self, layer_name)
        raise TypeError(
            f"DoRA target {layer_name!r} is a {type(base_layer).__name__}; "
            "DoRA supports nn.Linear, transformers Conv1D and nn.Conv2d"
        )


class _DoRA(AdapterModule):
    """What both layer kinds share; a subclass gives W0 and s·B·A in the (out, …) layout and the
    branch ℓ = s·B·A·x."""

    mergeable = True
    lora_reducible = False

    def _init(self, base: nn.Module, config: DoRAConfig, a_shape: tuple, b_shape: tuple) -> None:
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.r, self.scaling = config.r, config.alpha / config.r
        self.lora_A = nn.Parameter(torch.empty(*a_shape, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(*b_shape, **kw))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # the norm a merge used, kept until the unmerge (not saved: a merged state is not a checkpoint)
        self.register_buffer("merged_norm", None, persistent=False)
        with torch.no_grad(), gathered([base.weight]):  # ZeRO-3: the norm needs the whole weight
            # the very computation of the forward's norm, so that m / n is exactly 1 at init
            self.magnitude = nn.Parameter(self.weight_norm(base))

    @property
    def rank(self) -> int:
        return self.r

    # -- the layer kind's parts ----------------------------------------------------------------
    def base_matrix(self, base: nn.Module) -> torch.Tensor:
        """W0 (or the merged weight) in the (out, …) layout."""
        return base.weight

    def write_base(self, base: nn.Module, weight: torch.Tensor) -> None:
        base.weight.copy_(weight.to(base.weight.dtype))

    def lora_weight(self) -> torch.Tensor:
        """s·B·A in the (out, …) layout."""
        raise NotImplementedError

    def _view(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A per-output vector shaped to scale ``like`` (out, …) row-wise."""
        return v.view(-1, *[1] * (like.dim() - 1))

    # -- the decomposition ---------------------------------------------------------------------
    def weight_norm(self, base: nn.Module) -> torch.Tensor:
        """n = ‖W0 + s·B·A‖ per output, detached (Sec. 4.3): no gradient flows through it."""
        with torch.no_grad():
            weight = self.unmerged_weight(base) + self.lora_weight()
            return weight.flatten(1).norm(dim=1).to(weight.dtype)

    def unmerged_weight(self, base: nn.Module) -> torch.Tensor:
        """W0, also while this adapter is merged (recovered from the merged weight and its norm)."""
        weight = self.base_matrix(base)
        if self.merged_norm is None:
            return weight
        ratio = self._view(self.merged_norm / self.magnitude, weight)
        return weight * ratio - self.lora_weight()

    def magnitude_scale(self, base: nn.Module) -> torch.Tensor:
        """m / n (per output): the magnitude carries the gradient, the norm does not."""
        return self.magnitude / self.weight_norm(base)

    def dora_weight(self, base: nn.Module) -> torch.Tensor:
        """W' = m ⊙ (W0 + s·B·A) / n in the (out, …) layout."""
        w0 = self.unmerged_weight(base)
        direction = w0 + self.lora_weight()
        return self._view(self.magnitude / self.weight_norm(base), w0) * direction

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        delta = self.dora_weight(base_layer) - self.unmerged_weight(base_layer)
        return self._to_base_layout(delta)

    def _to_base_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def merge_into(self, base_layer: nn.Module) -> None:
        norm = self.weight_norm(base_layer)
        merged = self.dora_weight(base_layer)
        self.write_base(base_layer, merged)
        self.merged_norm = norm

    def unmerge_from(self, base_layer: nn.Module) -> None:
        if self.merged_norm is None:
            raise RuntimeError("DoRA: unmerge of an adapter that is not merged")
        w0 = self.unmerged_weight(base_layer)
        self.merged_norm = None
        self.write_base(base_layer, w0)

    def lora_factors(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError(
            "DoRA cannot be written as a plain LoRA: its ΔW = (m/n − 1)⊙W0 + (m/n)⊙s·B·A is "
            "full-rank (dora_factors gives A, s·B and m; the peft export writes use_dora)"
        )

    def dora_factors(
        self, base_layer: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, s·B, m) in peft's shapes (A and B as LoRA's, m one value per output): what peft's
        ``use_dora`` layer holds with α = r."""
        return self.lora_A, self.lora_B * self.scaling, self.magnitude

    peft_flags: ClassVar[dict[str, Any]] = {"use_dora": True}

    def peft_tensors(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        """peft's DoRA layer with α = r: A, s·B and the magnitude (peft keeps a conv's as
        (1, out, 1, 1))."""
        a, b, magnitude = self.dora_factors(base_layer)
        shape = (1, -1, 1, 1) if isinstance(base_layer, nn.Conv2d) else (-1,)
        return {
            "lora_A.weight": a,
            "lora_B.weight": b,
            "lora_magnitude_vector": magnitude.reshape(shape),
        }

    def weight_components(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank-1 components of the directional update, scaled as in the output:
        (Aᵀ, (m/n)⊙s·B)."""
        scale = self.magnitude_scale(base_layer)
        b = self.lora_B.flatten(1) * self.scaling * scale[:, None]
        return self.lora_A.flatten(1).T, b

    def _combine(
        self, y: torch.Tensor, base_out: torch.Tensor, lora: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        """y + (m/n − 1)·W0x + (m/n)·ℓ, the scale broadcast over the output features."""
        return y + ((scale - 1) * base_out + scale * lora).to(y.dtype)

    def _dropping(self) -> bool:
        return self.training and not isinstance(self.dropout, nn.Identity)


class DoRALinear(_DoRA):
    """DoRA on a Linear or Conv1D: ``lora_A`` (r, in), ``lora_B`` (out, r), ``magnitude`` (out,)."""

    def __init__(self, base: nn.Module, config: DoRAConfig, layer_name: str = "") -> None:
        super().__init__()
        d_in, d_out = linear_shape(base)
        self.transposed = is_conv1d(base)
        self._init(base, config, (config.r, d_in), (d_out, config.r))

    def base_matrix(self, base: nn.Module) -> torch.Tensor:
        return base.weight.T if self.transposed else base.weight

    def write_base(self, base: nn.Module, weight: torch.Tensor) -> None:
        super().write_base(base, weight.T if self.transposed else weight)

    def _to_base_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.transposed else weight

    def lora_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(
        self, base_layer: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer
    ) -> torch.Tensor:
        xd = self.dropout(x)
        h = F.linear(xd, self.lora_A)
        scale = self.magnitude_scale(base_layer)
        if layer.recording:
            layer.record(self, h, self.lora_B * self.scaling * scale[:, None])
        if self._dropping():
            base_out = F.linear(xd, self.base_matrix(base_layer))
        else:
            bias = getattr(base_layer, "bias", None)
            base_out = y if bias is None else y - bias
        return self._combine(y, base_out, F.linear(h, self.lora_B) * self.scaling, scale)


class DoRAConv2d(_DoRA):
    """DoRA on a Conv2d: A a conv with the base's kernel to r channels, B a 1×1 conv (as LoRA's),
    ``magnitude`` one value per output channel (peft stores it as (1, out, 1, 1))."""

    def __init__(self, base: nn.Conv2d, config: DoRAConfig, layer_name: str = "") -> None:
        super().__init__()
        if base.groups != 1:
            raise ValueError(
                f"{layer_name}: DoRA on a grouped Conv2d (groups={base.groups}) is not supported"
            )
        if base.padding_mode != "zeros":
            raise ValueError(
                f"{layer_name}: DoRA on Conv2d needs padding_mode='zeros', got {base.padding_mode!r}"
            )
        self._init(
            base,
            config,
            (config.r, base.in_channels, *base.kernel_size),
            (base.out_channels, config.r, 1, 1),
        )

    def lora_weight(self) -> torch.Tensor:
        w = self.lora_B.flatten(1) @ self.lora_A.flatten(1)
        return w.view(self.lora_B.shape[0], *self.lora_A.shape[1:]) * self.scaling

    def forward(
        self, base_layer: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer
    ) -> torch.Tensor:
        xd = self.dropout(x)
        conv = {
            "stride": base_layer.stride,
            "padding": base_layer.padding,
            "dilation": base_layer.dilation,
        }
        h = F.conv2d(xd, self.lora_A, None, **conv)
        scale = self.magnitude_scale(base_layer)
        if layer.recording:  # ReSoRA: every output position is a sample of the r components
            b = self.lora_B.flatten(1) * self.scaling * scale[:, None]
            layer.record(self, h.flatten(2).transpose(1, 2), b)
        if self._dropping():
            base_out = F.conv2d(xd, base_layer.weight, None, **conv)
        else:
            bias = base_layer.bias
            base_out = y if bias is None else y - bias.view(1, -1, 1, 1)
        lora = F.conv2d(h, self.lora_B) * self.scaling
        return self._combine(y, base_out, lora, scale.view(1, -1, 1, 1))
