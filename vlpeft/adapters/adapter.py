"""Houlsby et al. (ICML 2019) bottleneck adapter, applied sequentially to a module's output:
y' = y + up(act(down(y))), with ``up`` zero-initialised so injection changes no output.

Two options reproduce Qu et al.'s reference code (tingyu215/Routing_VLPEFT, ``models/vit_roberta.py``
``Adapter``, run without ``--add_res``): ``residual=False`` returns up(act(down(y))) in place of y
(no skip: the adapter's output replaces the sublayer's), and ``init="normal"`` draws both
projections' weights from N(0, 0.02) with zero biases (what transformers' ``_init_weights`` gives
the reference's newly created ``nn.Linear``s), so injection does change the output.

VL-Adapter (Sung et al., CVPR 2022) puts one after the attention output projection and one after the
second FFN linear of every layer, with bottleneck d/8 (768/8 = 96 for BART-base); the target
suffixes for that recipe on BART are ``["self_attn.out_proj", "encoder_attn.out_proj", "fc2"]``.

With ``routing`` (Qu et al. 2024) the down-projections of y and x_R (bias included) are routed
before the activation: y + up(act(route(down(y), down(x_R)))).

``parallel=True`` reads the target module's *input* x instead of its output (a parallel adapter,
He et al. ICLR 2022; I-Tuning, Luo et al. ICASSP 2023, beside GPT-2's FFN — Qu et al.'s
"Adapter†"): y + up(act(route(down(x), down(x_R)))). ``routing="cross_attention"`` is I-Tuning's
module (Qu et al. Sec. 4.3, Fig. A1(b)): y + up(attn(down(x), key(X_R), value(X_R))), softmax
attention with ``attention_heads`` heads over x_R's tokens, the query/key/value mappings d → m with
bias, ``up`` the output mapping (zero-initialised); no activation (the attention is the nonlinearity).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import torch
from torch import nn

from ..config import check
from .base import AdaptedLayer, AdapterModule, factory_kwargs, is_conv1d, register_method
from .routing import CROSS_ATTENTION, RoutableConfig, attend, make_routing

INITS = ("zero", "normal")
INIT_STD = 0.02  # RoBERTa's / GPT-2's initializer_range: the reference's adapter init

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_new": functools.partial(nn.GELU, approximate="tanh"),  # GPT-2's (tanh approximation)
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


def input_features(module: nn.Module) -> int | None:
    """Width of a module's input: a Linear/Conv1D/LayerNorm itself, else its first such submodule."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            return sub.in_features
        if is_conv1d(sub):
            return sub.weight.shape[0]
        if isinstance(sub, nn.LayerNorm):
            return sub.normalized_shape[-1]
    return None


@register_method("adapter")
@dataclasses.dataclass
class AdapterConfig(RoutableConfig):
    """Sequential bottleneck adapter.

    Args:
        bottleneck: hidden size m of the adapter; when None, ``dim // reduction_factor``.
        reduction_factor: used when ``bottleneck`` is None (VL-Adapter: 8).
        activation: one of relu, gelu, gelu_new (GPT-2's tanh approximation), silu, tanh, identity.
        dim: output width of the target module; inferred from Linear/Conv1D/LayerNorm when None.
        parallel: read the target's input and add to its output (a parallel adapter, e.g. on
            GPT-2's whole ``mlp``: I-Tuning's placement) instead of adapting its output.
        routing, separate_mapping, visual_dim, visual_tokens, attention_heads: see
            :class:`~vlpeft.adapters.routing.RoutableConfig`; routing acts on the
            down-projections before the activation; ``"cross_attention"`` is I-Tuning's module.
        residual: add the adapter to the target's output (default); False: the adapter's output
            replaces it (Qu et al.'s reference code; sequential adapters only).
        init: ``"zero"`` (``up`` zero-initialised, ``down`` PyTorch's default: injection changes
            no output) or ``"normal"`` (both weights N(0, 0.02), biases 0: the reference code's).
    """

    placement: ClassVar[str] = "adapter"  # after the attention output and the second FFN linear
    cross_attention: ClassVar[bool] = True

    bottleneck: int | None = None
    reduction_factor: int = 8
    activation: str = "relu"
    dim: int | None = None
    parallel: bool = False
    residual: bool = True
    init: str = "zero"

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
        if not isinstance(self.parallel, bool):
            raise ValueError(f"AdapterConfig.parallel must be true or false, got {self.parallel!r}")
        if not isinstance(self.residual, bool):
            raise ValueError(f"AdapterConfig.residual must be true or false, got {self.residual!r}")
        if self.parallel and not self.residual:
            raise ValueError(
                "AdapterConfig.residual=False replaces the target's output, which a parallel "
                "adapter (parallel=True) is added to: set residual=True or parallel=False"
            )
        check(self.init in INITS, "AdapterConfig.init", f"one of {list(INITS)}", self.init)

    def build(self, base_layer: nn.Module, layer_name: str) -> AdapterModule:
        dim = self.dim or output_features(base_layer, layer_name)
        d_in = input_features(base_layer)
        if self.parallel and not self.dim and d_in != dim:
            raise ValueError(
                f"{layer_name}: a parallel adapter adds up(down(input)) to the output, but the "
                f"input width {d_in} differs from the output width {dim}: target a module whose "
                "widths agree (GPT-2's whole mlp, a block) or set AdapterConfig.parallel=False"
            )
        bottleneck = self.bottleneck or max(1, dim // self.reduction_factor)
        return BottleneckAdapter(
            dim, bottleneck, self.activation, make_routing(self, layer_name, dim),
            parallel=self.parallel, heads=self.attention_heads, residual=self.residual,
            init=self.init, **factory_kwargs(base_layer),
        )  # fmt: skip


class BottleneckAdapter(AdapterModule):
    """y + up(act(down(y))) on the base output (``parallel``: of the base input x; without
    ``residual``: up(act(down(y))) alone); not mergeable (the activation is nonlinear). ``down_visual`` is the separate mapping of x_R of a routed
    adapter that has one; ``key`` and ``value`` the x_R mappings of cross-attention (``down`` is
    then its query mapping and ``up`` its output mapping)."""

    mergeable = False

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        activation: str,
        routing=None,
        parallel: bool = False,
        heads: int = 1,
        residual: bool = True,
        init: str = "zero",
        **kw,
    ) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, **kw)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim, **kw)
        if init == "normal":  # transformers' _init_weights, as the reference's adapters get
            for linear in (self.down, self.up):
                nn.init.normal_(linear.weight, std=INIT_STD)
                nn.init.zeros_(linear.bias)
        else:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self.routing, self.parallel, self.residual = routing, parallel, residual
        self.down_visual = self.key = self.value = None
        self.heads = None
        if routing is not None and routing.configured_kind == CROSS_ATTENTION:
            if bottleneck % heads:
                raise ValueError(
                    f"{routing.layer_name}: AdapterConfig.attention_heads={heads} must divide "
                    f"the bottleneck {bottleneck}"
                )
            self.heads = heads
            self.key = nn.Linear(routing.visual_dim, bottleneck, **kw)
            self.value = nn.Linear(routing.visual_dim, bottleneck, **kw)
        elif routing is not None and routing.separate:
            self.down_visual = nn.Linear(routing.visual_dim, bottleneck, **kw)

    @property
    def rank(self) -> int:
        return self.down.out_features

    def visual_bottleneck(self, x_r: torch.Tensor) -> torch.Tensor:
        return (self.down_visual or self.down)(x_r)

    def cross_attend(self, h: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        """attn(h, key(X_R), value(X_R)) for the query h = down(x): (..., bottleneck)."""
        tokens = h.unsqueeze(1) if h.dim() == 2 else h
        x_r = self.routing.x_r(layer, tokens.shape[0]).to(tokens.dtype)
        x_r = x_r if x_r.dim() == 3 else x_r[:, None]
        out = attend(tokens, self.key(x_r), self.value(x_r), self.heads)
        return out.squeeze(1) if h.dim() == 2 else out

    def bottleneck_activations(self, y: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        h = self.down(y)
        if self.heads is not None:
            return self.cross_attend(h, layer)
        if self.routing is not None:
            h = self.routing(h, layer, self.visual_bottleneck)
        return self.act(h)

    def forward(
        self, base_layer: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer
    ) -> torch.Tensor:
        h = self.bottleneck_activations(x.to(y.dtype) if self.parallel else y, layer)
        layer.record(self, h, self.up.weight)
        return y + self.up(h) if self.residual else self.up(h)

    def weight_components(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return self.down.weight.T, self.up.weight
