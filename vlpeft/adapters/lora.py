"""LoRA (Hu et al., ICLR 2022, Eq. 3): h = W0·x + (α/r)·B·A·x with A kaiming-uniform and B zero.

Supported base layers: ``nn.Linear``, transformers' ``Conv1D`` (GPT-2; weight stored as (in, out))
and ``nn.Conv2d`` (A is a conv with the base kernel, B a 1×1 conv, as in peft). For a fused
projection such as GPT-2's ``c_attn`` (q|k|v), ``slices`` puts an independent rank-r LoRA on chosen
equal parts of the output only, e.g. ``slices={"c_attn": {"parts": 3, "use": [0, 2]}}`` for q and v.

With ``routing`` (Qu et al. 2024) the bottleneck A·x is routed with A·x_R (or a separate mapping):
the branch is (α/r)·B·route(A·x, A·x_R), per slice for fused layers; see :mod:`.routing`.

The structures of Qu et al. Sec. 4.3 / App. A (Fig. A1), with m = ``mapping_rank`` (r/4):

- ``separate_mapping="merge"``: (α/r)·B·M·route(A·x, A_v·x_R), M the m → r up-projection;
- ``separate_mapping="split"`` (Fig. A1(d), d → r/4 → r → d):
  (α/r)·B·route(U·A·x, U_v·A_v·x_R) with U, U_v the m → r up-projections of x_H and x_R;
- ``routing="cross_attention"`` (Fig. A1(c)): (α/r)·B·U·W_o·attn(W_q·A·x, W_k·A_v·X_R,
  W_v·A_v·X_R), softmax attention with ``attention_heads`` heads over x_R's tokens.

For a fused layer with S slices, U, U_v and the attention's W_q/W_k/W_v/W_o act on the S slices'
concatenated bottleneck (S·m → S·r, S·m → S·m), as the reference code's modules on GPT-2's
c_attn do (``loralib/layers.py``: ``MergedLinearSplit``, ``MergedLinearSplitAttn``); A, A_v and
B stay per slice.

A routed LoRA without slices, dropout or a mapping up-projection runs as one autograd function
(:class:`_RoutedLoRA`): x_R's down-projection once per call, the routing function and (α/r)·B
folded into one ``addmm`` with y, and a written-out backward (the routing's gradient as two or three
batched products instead of autograd's chain of elementwise operators and reductions; the two
mappings' gradients of A summed in one ``addmm``). It gives what the composed path gives; that path
remains for slices, dropout, ``mapping_rank`` < r, ReSoRA recording and ``torch.compile``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdaptedLayer, AdapterModule, is_conv1d, linear_shape, register_method
from .routing import CROSS_ATTENTION, RoutableConfig, attend, compute_dtype, make_routing


@register_method("lora")
@dataclasses.dataclass
class LoRAConfig(RoutableConfig):
    """LoRA.

    Args:
        r: rank of the update.
        alpha: scaling numerator; the branch is multiplied by alpha / r. None (default): α = r,
            scale 1 — what Qu et al. 2024 use and peft's defaults give (r = 8, α = 8).
        dropout: dropout probability on the LoRA branch's input.
        slices: module-name suffix → ``{"parts": P, "use": [i, ...]}``: split the output of a fused
            projection into P equal parts and adapt only parts ``use`` (one rank-r LoRA each).
        routing, separate_mapping, visual_dim, visual_tokens, attention_heads: see
            :class:`~vlpeft.adapters.routing.RoutableConfig` (``"split"`` and
            ``"cross_attention"``: the module docstring).
        mapping_rank: with ``separate_mapping`` or cross-attention, the width m both x_H and
            x_R are down-projected to (Qu et al. App. A: d → r/4 → r → d). None: r // 4, the
            paper's. ``"merge"`` routes in m, then maps up m → r; with m = r it has no
            up-projection (an earlier vlpeft structure, more parameters).
    """

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    slices: dict[str, dict] = dataclasses.field(default_factory=dict)
    mapping_rank: int | None = None

    supports_slices: ClassVar[bool] = True
    layerwise_rank: ClassVar[bool] = True
    split_mapping: ClassVar[bool] = True
    cross_attention: ClassVar[bool] = True
    peft_flags: ClassVar[dict[str, Any] | None] = {"use_dora": False}
    peft_layer_tensors: ClassVar[dict[str, str]] = {
        "lora_A.weight": "lora_A",
        "lora_B.weight": "lora_B",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1:
            raise ValueError(f"LoRAConfig.r must be >= 1, got {self.r}")
        narrow = self.separate_mapping or self.routing == CROSS_ATTENTION
        if self.mapping_rank is not None and not narrow:
            raise ValueError(
                "LoRAConfig.mapping_rank is the width of a separate mapping or cross-attention"
            )
        if narrow and self.mapping_rank is None:
            self.mapping_rank = max(1, self.r // 4)
        if self.mapping_rank is not None and not 1 <= self.mapping_rank <= self.r:
            raise ValueError(
                f"LoRAConfig.mapping_rank must be in [1, r={self.r}], got {self.mapping_rank}"
            )
        if self.alpha is None:
            self.alpha = float(self.r)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout}")
        for key, spec in self.slices.items():
            if set(spec) != {"parts", "use"} or not spec["use"]:
                raise ValueError(
                    f"LoRAConfig.slices[{key!r}] must be {{'parts': P, 'use': [i, ...]}}, got {spec}"
                )
            if any(not 0 <= i < spec["parts"] for i in spec["use"]):
                raise ValueError(
                    f"LoRAConfig.slices[{key!r}].use must index parts 0..{spec['parts'] - 1}"
                )

    def slice_spec(self, layer_name: str) -> dict | None:
        if layer_name in self.slices:  # an exact name (what a checkpoint records)
            return self.slices[layer_name]
        exact = getattr(self, "exact_names", False)  # read from a file: no pattern is compiled
        for key, spec in self.slices.items():
            if exact:
                if layer_name.endswith("." + key):
                    return spec
                continue
            if layer_name == key or layer_name.endswith("." + key) or re.fullmatch(key, layer_name):
                return spec
        return None

    def build(self, base_layer: nn.Module, layer_name: str) -> AdapterModule:
        if isinstance(base_layer, nn.Conv2d):
            if self.routing:
                raise TypeError(f"{layer_name}: routed LoRA supports Linear and Conv1D layers")
            return LoRAConv2d(base_layer, self, layer_name)
        if isinstance(base_layer, nn.Linear) or is_conv1d(base_layer):
            return LoRALinear(base_layer, self, layer_name)
        raise TypeError(
            f"LoRA target {layer_name!r} is a {type(base_layer).__name__}; "
            "LoRA supports nn.Linear, transformers Conv1D and nn.Conv2d"
        )


class LoRALinear(AdapterModule):
    """LoRA on a Linear or Conv1D, optionally on equal output slices of a fused projection.

    Parameters: ``lora_A`` (S·r, in) and ``lora_B`` (S·d_s, r) for S adapted slices of width d_s
    (S = 1 and d_s = out without slices). With a separate mapping or cross-attention of width m
    (the paper's structures): ``lora_A`` (S·m, in) and ``lora_A_visual`` (S·m, visual_dim);
    ``"merge"``: ``lora_mid`` (S·r, m), the per-slice up-projection of the routed bottleneck;
    ``"split"``: ``lora_up`` and ``lora_up_visual`` (S·r, S·m); cross-attention: ``lora_attn_q``,
    ``lora_attn_k``, ``lora_attn_v``, ``lora_attn_o`` (S·m, S·m) and ``lora_up`` (S·r, S·m).
    """

    mergeable = True
    lora_reducible = True

    def __init__(self, base: nn.Module, config: LoRAConfig, layer_name: str) -> None:
        super().__init__()
        d_in, d_out = linear_shape(base)
        spec = config.slice_spec(layer_name)
        if spec is None:
            self.slice_index: list[int] | None = None
            n_slices, width = 1, d_out
        else:
            if d_out % spec["parts"]:
                raise ValueError(
                    f"{layer_name}: output size {d_out} is not divisible into {spec['parts']} parts"
                )
            width = d_out // spec["parts"]
            self.slice_index = list(spec["use"])
            n_slices = len(self.slice_index)
        self.r, self.n_slices, self.width, self.d_out = config.r, n_slices, width, d_out
        self.scaling = config.alpha / config.r
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.routing = make_routing(config, layer_name, d_in, n_slices)
        mapping = self.routing.separate if self.routing is not None else False
        cross = self.routing is not None and self.routing.configured_kind == CROSS_ATTENTION
        # the bottleneck x_H (and x_R) is mapped to: r, or the separate mapping's width m
        self.m = config.mapping_rank if mapping or cross else config.r
        self.lora_A = _kaiming(n_slices, self.m, d_in, **kw)
        self.lora_B = nn.Parameter(torch.zeros(n_slices * width, config.r, **kw))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A_visual = self.lora_mid = self.lora_up = self.lora_up_visual = None
        self.heads = config.attention_heads if cross else None
        if self.routing is not None:
            self.mergeable = self.lora_reducible = False
        if mapping or cross:
            self.lora_A_visual = _kaiming(n_slices, self.m, self.routing.visual_dim, **kw)
        if mapping == "merge" and self.m != config.r:
            self.lora_mid = _kaiming(n_slices, config.r, self.m, **kw)
        wide, narrow = n_slices * config.r, n_slices * self.m  # the slices' concatenation
        if mapping == "split" or cross:
            self.lora_up = _kaiming(1, wide, narrow, **kw)
        if mapping == "split":
            self.lora_up_visual = _kaiming(1, wide, narrow, **kw)
        if cross:
            if narrow % self.heads:
                raise ValueError(
                    f"{layer_name}: LoRAConfig.attention_heads={self.heads} must divide the "
                    f"cross-attention width {narrow} (slices × mapping_rank)"
                )
            for name in ("q", "k", "v", "o"):
                setattr(self, f"lora_attn_{name}", _kaiming(1, narrow, narrow, **kw))

    @property
    def rank(self) -> int:
        return self.r * self.n_slices

    @property
    def factor_scale(self) -> float:
        return self.scaling

    @property
    def slice_spec(self) -> dict | None:
        if self.slice_index is None:
            return None
        return {"parts": self.d_out // self.width, "use": self.slice_index}

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """A·dropout(x): (..., S·r)."""
        return F.linear(self.dropout(x), self.lora_A)

    def visual_bottleneck(self, x_r: torch.Tensor) -> torch.Tensor:
        """x_R through A (or the separate mapping; ``"split"``: and its up-projection)."""
        mapping = self.lora_A if self.lora_A_visual is None else self.lora_A_visual
        v = F.linear(self.dropout(x_r), mapping)
        return v if self.lora_up_visual is None else F.linear(v, self.lora_up_visual)

    def cross_attend(self, h: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        """U·W_o·attn(W_q·h, W_k·A_v·X_R, W_v·A_v·X_R) for the bottleneck h = A·x: (..., S·r)."""
        tokens = h.unsqueeze(1) if h.dim() == 2 else h
        x_r = self.routing.x_r(layer, tokens.shape[0]).to(tokens.dtype)
        visual = F.linear(self.dropout(x_r if x_r.dim() == 3 else x_r[:, None]), self.lora_A_visual)
        out = attend(
            F.linear(tokens, self.lora_attn_q),
            F.linear(visual, self.lora_attn_k),
            F.linear(visual, self.lora_attn_v),
            self.heads,
        )
        out = F.linear(F.linear(out, self.lora_attn_o), self.lora_up)
        return out.squeeze(1) if h.dim() == 2 else out

    def expand(self, h: torch.Tensor) -> torch.Tensor:
        """(α/r)·B·h placed in the full output width: (..., d_out)."""
        if self.n_slices == 1 and self.slice_index is None:
            return F.linear(h, self.lora_B) * self.scaling
        hs = h.unflatten(-1, (self.n_slices, self.r))
        parts = torch.einsum(
            "...sr,sdr->...sd", hs, self.lora_B.view(self.n_slices, self.width, self.r)
        )
        return self._scatter(parts * self.scaling)

    def _scatter(self, parts: torch.Tensor) -> torch.Tensor:
        """(..., S, d_s) adapted slices → (..., d_out) with zeros in the parts left alone."""
        full = parts.new_zeros(*parts.shape[:-2], self.d_out // self.width, self.width)
        full[..., self.slice_index, :] = parts
        return full.flatten(-2)

    def up_mid(self, h: torch.Tensor) -> torch.Tensor:
        """The separate mapping's m → r up-projection of the routed bottleneck, per slice."""
        if self.n_slices == 1:
            return F.linear(h, self.lora_mid)
        hs = h.unflatten(-1, (self.n_slices, self.m))
        mid = self.lora_mid.view(self.n_slices, self.r, self.m)
        return torch.einsum("...sm,srm->...sr", hs, mid).flatten(-2)

    def fusable(self, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer) -> bool:
        """Whether this call can take :class:`_RoutedLoRA` (module docstring)."""
        return (
            self.routing is not None
            and self.routing.groups == 1
            and self.slice_index is None
            and self.lora_mid is None
            and self.lora_up is None
            and self.routing.pool
            and isinstance(self.dropout, nn.Identity)
            and y.dtype == compute_dtype(x, self.lora_A.dtype)
            and x.dim() in (2, 3)
            and x.shape[:-1] == y.shape[:-1]
            and not layer.recording
            and not torch.compiler.is_compiling()
        )

    def routed(self, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        """y + (α/r)·B·route(A·x, A_v·x_R) through :class:`_RoutedLoRA`."""
        tokens = (x.unsqueeze(1) if x.dim() == 2 else x).to(y.dtype)  # (B, L, d), autocast's
        x_r = self.routing.x_r(layer, tokens.shape[0]).to(y.dtype)
        if x_r.dim() == 3:  # several visual tokens: the mapping is linear, so pool them first
            x_r = x_r.mean(dim=1)
        mapping = self.lora_A if self.lora_A_visual is None else self.lora_A_visual
        out = _RoutedLoRA.apply(
            tokens, y.reshape(-1, y.shape[-1]), x_r, self.lora_A, mapping, self.lora_B,
            self.scaling, self.routing.kind, self.lora_A_visual is None,
        )  # fmt: skip
        return out.view(y.shape)

    def forward(
        self, base_layer: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer
    ) -> torch.Tensor:
        if self.fusable(x, y, layer):
            return self.routed(x, y, layer)
        h = self.bottleneck(x)
        if self.heads is not None:
            h = self.cross_attend(h, layer)
        elif self.routing is not None:
            if self.lora_up is not None:  # "split": x_H's own m → r before routing in r
                h = F.linear(h, self.lora_up)
            h = self.routing(h, layer, self.visual_bottleneck)
        if self.lora_mid is not None:
            h = self.up_mid(h)
        if layer.recording:
            layer.record(self, h, self._dense_b() * self.scaling)
        if self.slice_index is None and h.dtype == y.dtype and y.dim() >= 2:
            # y + (α/r)·B·h as one GEMM that accumulates into a copy of y: no (…, d_out)-sized
            # temporaries for the product, the scaling and the sum (peft makes all three)
            rows = y.reshape(-1, y.shape[-1])
            return torch.addmm(
                rows, h.reshape(-1, h.shape[-1]), self.lora_B.T, alpha=self.scaling
            ).view(y.shape)
        return y + self.expand(h).to(y.dtype)

    def _dense_b(self) -> torch.Tensor:
        """B as one (d_out, S·r) matrix: block-structured when slices are used."""
        if self.slice_index is None:
            return self.lora_B
        blocks = torch.block_diag(*self.lora_B.view(self.n_slices, self.width, self.r))
        return self._scatter(blocks.T.unflatten(-1, (self.n_slices, self.width))).T

    def lora_factors(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.lora_A
        if self.lora_mid is not None:  # A of the rank-r components: mid·A per slice
            mid = self.lora_mid.view(self.n_slices, self.r, self.m)
            a = (mid @ a.view(self.n_slices, self.m, -1)).flatten(0, 1)
        return a, self._dense_b() * self.scaling


class _RoutedLoRA(torch.autograd.Function):
    """out = y + scaling·route(x·Aᵀ, x_R·A_vᵀ)·Bᵀ for x (B, L, d), y (B·L, d_out), x_R (B, d_v),
    every routing kind of :func:`~vlpeft.adapters.routing.route`, with the backward written out.
    ``shared``: A_v is A (one parameter, its two gradient terms summed)."""

    @staticmethod
    def forward(ctx, x, y, x_r, lora_a, mapping, lora_b, scaling, kind, shared):
        ctx.device, ctx.parameter_dtype = x.device.type, lora_a.dtype
        lora_a, mapping, lora_b = (w.to(x.dtype) for w in (lora_a, mapping, lora_b))  # autocast
        batch, length, _ = x.shape
        h = (x.reshape(-1, x.shape[-1]) @ lora_a.T).view(batch, length, -1)  # (B, L, r)
        v = x_r @ mapping.T  # (B, r)
        relu = kind.startswith("relu_")
        base = kind[5:] if relu else kind
        t, w = (torch.relu(h), torch.relu(v)) if relu else (h, v)
        c = None
        if base == "mul":
            routed = t * w[:, None]
        elif base == "add":
            routed = t + w[:, None]
        elif base == "proj":  # (t·w) v
            c = torch.bmm(t, w[:, :, None])  # (B, L, 1)
            routed = c * v[:, None]
        else:  # expand: (Σ_k t_k) w
            c = t.sum(-1, keepdim=True)
            routed = c * w[:, None]
        rows = routed.view(-1, routed.shape[-1])
        ctx.kind, ctx.base, ctx.relu, ctx.scaling, ctx.shared = kind, base, relu, scaling, shared
        ctx.save_for_backward(x, x_r, lora_a, mapping, lora_b, h, v, t, w, c, rows)
        return torch.addmm(y, rows, lora_b.T, alpha=scaling)

    @staticmethod
    def backward(ctx, g):
        with torch.autocast(ctx.device, enabled=False):
            grads = _RoutedLoRA._backward(ctx, g)
        dtype = ctx.parameter_dtype
        return tuple(
            t.to(dtype) if t is not None and i in (3, 4, 5) else t for i, t in enumerate(grads)
        )

    @staticmethod
    def _backward(ctx, g):
        x, x_r, lora_a, mapping, lora_b, h, v, t, w, c, rows = ctx.saved_tensors
        s, base = ctx.scaling, ctx.base
        # beta=0: the first argument only gives the shape; (α/r) folded into the products
        g_routed = torch.addmm(rows, g, lora_b, beta=0, alpha=s).view(h.shape)  # (B, L, r)
        grad_b = torch.addmm(lora_b, g.T, rows, beta=0, alpha=s)
        if base == "mul":
            g_t = g_routed * w[:, None]
            g_w = torch.bmm(g_routed.transpose(1, 2), t).diagonal(dim1=1, dim2=2)  # Σ_l g∘t
            g_v = None
        elif base == "add":
            g_t, g_w, g_v = g_routed, g_routed.sum(1), None
        elif base == "proj":
            g_c = torch.bmm(g_routed, v[:, :, None])  # (B, L, 1)
            g_t = g_c * w[:, None]
            g_v = torch.bmm(c.transpose(1, 2), g_routed)  # through the last factor
            if ctx.relu:
                g_w, g_v = torch.bmm(g_c.transpose(1, 2), t).squeeze(1), g_v.squeeze(1)
            else:  # w is v: both terms in one product
                g_v = torch.baddbmm(g_v, g_c.transpose(1, 2), t).squeeze(1)
                g_w = None
        else:  # expand
            g_c = torch.bmm(g_routed, w[:, :, None])
            g_t = g_c.expand_as(t)
            g_w = torch.bmm(c.transpose(1, 2), g_routed).squeeze(1)
            g_v = None
        if ctx.relu:
            g_t = torch.where(h > 0, g_t, 0)
            g_w = torch.where(v > 0, g_w, 0)
        if g_w is not None:
            g_v = g_w if g_v is None else g_v + g_w
        g_h = g_t.reshape(-1, g_t.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = (g_h @ lora_a).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_x_r = g_v @ mapping if ctx.needs_input_grad[2] else None
        if ctx.shared:  # both mappings are A: one product accumulates into the other
            grad_a, grad_mapping = torch.addmm(g_v.T @ x_r, g_h.T, x2), None
        else:
            grad_a, grad_mapping = g_h.T @ x2, g_v.T @ x_r
        return grad_x, g, grad_x_r, grad_a, grad_mapping, grad_b, None, None, None


def _kaiming(groups: int, rows: int, cols: int, **kw) -> nn.Parameter:
    """(groups·rows, cols), each group kaiming-uniform as an nn.Linear weight (peft's init of A)."""
    weight = torch.empty(groups * rows, cols, **kw)
    for block in weight.view(groups, rows, cols):
        nn.init.kaiming_uniform_(block, a=math.sqrt(5))
    return nn.Parameter(weight)


class LoRAConv2d(AdapterModule):
    """LoRA on a Conv2d: A is a conv with the base's kernel/stride/padding/dilation to r channels,
    B a 1×1 conv back to the output channels; ΔW = (α/r)·(B ⊗ A) of shape (out, in, kh, kw)."""

    mergeable = True
    lora_reducible = True

    def __init__(self, base: nn.Conv2d, config: LoRAConfig, layer_name: str) -> None:
        super().__init__()
        if base.groups != 1:
            raise ValueError(
                f"{layer_name}: LoRA on a grouped Conv2d (groups={base.groups}) cannot be merged; "
                "use FLoRA, which handles grouped and depthwise convolutions"
            )
        if base.padding_mode != "zeros":
            raise ValueError(
                f"{layer_name}: LoRA on Conv2d needs padding_mode='zeros', got {base.padding_mode!r}"
            )
        self.r, self.scaling = config.r, config.alpha / config.r
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(config.r, base.in_channels, *base.kernel_size, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_channels, config.r, 1, 1, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @property
    def rank(self) -> int:
        return self.r

    @property
    def factor_scale(self) -> float:
        return self.scaling

    def forward(
        self, base_layer: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer
    ) -> torch.Tensor:
        h = F.conv2d(
            self.dropout(x),
            self.lora_A,
            None,
            base_layer.stride,
            base_layer.padding,
            base_layer.dilation,
        )
        if layer.recording:  # ReSoRA: every output position is a sample of the r components
            layer.record(self, h.flatten(2).transpose(1, 2), self.lora_B.flatten(1) * self.scaling)
        return y + (F.conv2d(h, self.lora_B) * self.scaling).to(y.dtype)

    def lora_factors(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B * self.scaling
