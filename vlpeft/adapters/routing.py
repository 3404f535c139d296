"""Routing functions in the low-rank bottleneck (Qu, Tuytelaars, Moens, ECCV 2024, Sec. 3).

With x_t = W_down·x_H (L×r, the text/hidden tokens) and x_v = W_down·x_R (r, one visual vector;
several visual tokens are mean-pooled first), the bottleneck becomes ``route(kind, x_t, x_v)``:

- ``mul``    x_t ∘ x_v'                       (x_v broadcast over tokens)
- ``add``    x_t + x_v'
- ``proj``   x_t x_vᵀ x_v = (x_t·x_v) x_v     ("matrix multiplication 1")
- ``expand`` x_t x_v'' = (Σ_k x_t,k) x_v      ("matrix multiplication 2", x_v'' = x_v expanded to r×r)
- ``relu_<kind>``: ReLU on the first two factors, e.g. relu_proj = ReLU(x_t) ReLU(x_v)ᵀ x_v (Sec. 6).

A routed LoRA's whole branch is (α/r)·B·route(A·x, A·x_R) — the plain B·A·x term is not added; a
routed Adapter routes the down-projections (bias included) before the activation. With
``separate_mapping`` x_R gets its own down-projection (and may have another width than x_H).

x_R reaches the layers through :func:`routing_inputs`, a context the VL model sets for each forward.
Its keys are module-path prefixes ("" for all): a layer reads the value of the longest key that
prefixes its name, so an encoder and a decoder can route on different x_R. When the text batch is
B·k (beam search) and x_R has B rows, each row is repeated k times, as generation expands inputs.

GPT-2's fused ``c_attn`` with LoRA ``slices``: routing acts on each adapted projection's own
bottleneck (q and v separately). The official Routing_VLPEFT code routes over the concatenated q|v
bottleneck, which lets ``proj``/``expand`` mix q and v components; ours keeps them independent.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import BottleneckAdapter
from .lora import LoRALinear

BASE_KINDS = ("mul", "add", "proj", "expand")
KINDS = BASE_KINDS + tuple(f"relu_{k}" for k in BASE_KINDS)

_ROUTING_INPUTS: contextvars.ContextVar[dict[str, torch.Tensor] | None] = contextvars.ContextVar(
    "vlpeft_routing_inputs", default=None
)


def route(kind: str, x_t: torch.Tensor, x_v: torch.Tensor) -> torch.Tensor:
    """Applies routing function ``kind`` to x_t (..., L, r) and x_v (..., r) or (..., K, r).

    Example:
        >>> x_t, x_v = torch.ones(2, 3, 4), torch.full((2, 4), 2.0)
        >>> route("proj", x_t, x_v)[0, 0]
        tensor([16., 16., 16., 16.])
    """
    if kind not in KINDS:
        raise ValueError(f"unknown routing function {kind!r}; choose one of {list(KINDS)}")
    if x_v.dim() == x_t.dim():  # several visual tokens: average-pool to one vector
        x_v = x_v.mean(dim=-2)
    x_v = x_v.unsqueeze(-2)  # (..., 1, r), broadcast over tokens
    t, v = x_t, x_v
    if kind.startswith("relu_"):
        kind, t, v = kind[5:], F.relu(x_t), F.relu(x_v)
    if kind == "mul":
        return t * v
    if kind == "add":
        return t + v
    if kind == "proj":
        return (t * v).sum(-1, keepdim=True) * x_v
    return t.sum(-1, keepdim=True) * v  # expand


@contextlib.contextmanager
def routing_inputs(x_r: torch.Tensor | dict[str, torch.Tensor]) -> Iterator[None]:
    """Makes x_R available to routed layers during the ``with`` block.

    Args:
        x_r: one tensor (B, d) or (B, K, d) for every routed layer, or a dict mapping module-path
            prefixes to such tensors (longest matching prefix wins; "" matches every layer).
    """
    token = _ROUTING_INPUTS.set(x_r if isinstance(x_r, dict) else {"": x_r})
    try:
        yield
    finally:
        _ROUTING_INPUTS.reset(token)


def current_x_r(layer_name: str, batch: int, expected_dim: int | None = None) -> torch.Tensor:
    """The x_R of the layer ``layer_name`` for a text batch of ``batch`` rows (beam-expanded)."""
    inputs = _ROUTING_INPUTS.get()
    keys = [
        k for k in (inputs or {}) if k == "" or layer_name == k or layer_name.startswith(k + ".")
    ]
    if not keys:
        raise RuntimeError(
            f"routed layer {layer_name!r} was called without x_R: run the forward inside "
            "`with vlpeft.adapters.routing.routing_inputs(x_r):` (vlpeft VL models do this)"
        )
    x_r = inputs[max(keys, key=len)]
    if expected_dim is not None and x_r.shape[-1] != expected_dim:
        raise ValueError(
            f"routed layer {layer_name!r} maps x_R with a ({expected_dim} → r) matrix but x_R has "
            f"dim {x_r.shape[-1]}: use separate_mapping=True with visual_dim={x_r.shape[-1]}, or "
            "route only layers whose input width equals x_R's"
        )
    if x_r.shape[0] != batch:
        if batch % x_r.shape[0]:
            raise ValueError(
                f"{layer_name}: text batch {batch} is not a multiple of the x_R batch {x_r.shape[0]}"
            )
        x_r = x_r.repeat_interleave(batch // x_r.shape[0], dim=0)
    return x_r


def routed_layers(module: nn.Module) -> list[str]:
    """Names of the layers in ``module`` whose active adapters are routed (they need x_R)."""
    from .base import AdaptedLayer

    return [
        name
        for name, layer in module.named_modules()
        if isinstance(layer, AdaptedLayer)
        and any(isinstance(layer.adapters[a], ROUTED) for a in layer.active if a in layer.adapters)
    ]


def set_routing(module: nn.Module, kind: str | None) -> int:
    """Switches the routing function of every active routed adapter in ``module`` to ``kind``
    (None: back to each adapter's configured function).

    Returns the number of adapters switched (a task router calls this per task, so a task that
    names no routing function runs the configured one, not the previous task's).
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown routing function {kind!r}; choose one of {list(KINDS)}")
    from .base import AdaptedLayer

    switched = 0
    for layer in module.modules():
        if isinstance(layer, AdaptedLayer):
            for name in layer.active:
                adapter = layer.adapters[name] if name in layer.adapters else None
                if isinstance(adapter, ROUTED):
                    adapter.kind = kind or adapter.configured_kind
                    switched += 1
    return switched


def _as_tokens(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(B, L, d) view of a layer input; a (B, d) input is one token per example."""
    return (x.unsqueeze(1), True) if x.dim() == 2 else (x, False)


class RoutedLoRALinear(LoRALinear):
    """LoRA whose bottleneck is routed: (α/r)·B·route(A·x, A·x_R) (per slice for fused layers)."""

    mergeable = False
    lora_reducible = False

    def __init__(self, base: nn.Module, config, layer_name: str) -> None:
        super().__init__(base, config, layer_name)
        self.kind, self.layer_name = config.routing, layer_name
        self.configured_kind = config.routing
        self.lora_A_visual = None
        if config.separate_mapping:
            d_r = config.visual_dim or self.lora_A.shape[1]
            self.lora_A_visual = nn.Parameter(
                torch.empty(
                    self.lora_A.shape[0], d_r, dtype=self.lora_A.dtype, device=self.lora_A.device
                )
            )
            for a in self.lora_A_visual.view(self.n_slices, self.r, d_r):
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        tokens, squeezed = _as_tokens(x)
        mapping = self.lora_A if self.lora_A_visual is None else self.lora_A_visual
        x_r = current_x_r(self.layer_name, tokens.shape[0], mapping.shape[1]).to(tokens.dtype)
        x_t = F.linear(self.dropout(tokens), self.lora_A)
        x_v = F.linear(self.dropout(x_r), mapping)
        s = (self.n_slices, self.r)
        routed = route(
            self.kind, x_t.unflatten(-1, s).transpose(-2, -3), x_v.unflatten(-1, s).movedim(-2, 1)
        )
        routed = routed.transpose(-2, -3).flatten(-2)  # back to (B, L, S·r)
        return routed.squeeze(1) if squeezed else routed


class RoutedBottleneckAdapter(BottleneckAdapter):
    """Adapter with routing before the activation: y + up(act(route(down(y), down(x_R))))."""

    def __init__(
        self, dim: int, bottleneck: int, activation: str, config, layer_name: str, **kw
    ) -> None:
        super().__init__(dim, bottleneck, activation, **kw)
        self.kind, self.layer_name = config.routing, layer_name
        self.configured_kind = config.routing
        self.down_visual = (
            nn.Linear(config.visual_dim or dim, bottleneck, **kw)
            if config.separate_mapping
            else None
        )

    def bottleneck_activations(self, y: torch.Tensor) -> torch.Tensor:
        tokens, squeezed = _as_tokens(y)
        mapping = self.down_visual or self.down
        x_r = current_x_r(self.layer_name, tokens.shape[0], mapping.in_features).to(tokens.dtype)
        x_v = mapping(x_r)
        routed = route(self.kind, self.down(tokens), x_v)
        return self.act(routed.squeeze(1) if squeezed else routed)


ROUTED = (RoutedLoRALinear, RoutedBottleneckAdapter)
