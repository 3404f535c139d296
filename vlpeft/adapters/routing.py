"""Routing functions in the low-rank bottleneck (Qu, Tuytelaars, Moens, ECCV 2024, Sec. 3).

With x_t = W_down·x_H (L×r, the text/hidden tokens) and x_v = W_down·x_R (r, one visual vector;
several visual tokens are mean-pooled first), the bottleneck becomes ``route(kind, x_t, x_v)``:

- ``mul``    x_t ∘ x_v'                       (x_v broadcast over tokens)
- ``add``    x_t + x_v'
- ``proj``   x_t x_vᵀ x_v = (x_t·x_v) x_v     ("matrix multiplication 1")
- ``expand`` x_t x_v'' = (Σ_k x_t,k) x_v      ("matrix multiplication 2", x_v'' = x_v expanded to r×r)
- ``relu_<kind>``: ReLU on the first two factors, e.g. relu_proj = ReLU(x_t) ReLU(x_v)ᵀ x_v (Sec. 6).

With ``visual_tokens="all"`` (Sec. 4.3, footnote 6: the ViT's last hidden state as x_R) ``proj``
keeps every visual token: x_t X_vᵀ X_v = Σ_k (x_t·x_v,k) x_v,k. ``routing="cross_attention"`` is
the alignment Sec. 4.3 compares with: softmax attention of the text bottleneck over x_R's tokens,
with trainable query/key/value mappings (the method builds them; see LoRA and Adapter).

**Separate mappings** (Sec. 4.3, App. A, Fig. A1): ``separate_mapping="merge"`` gives x_R its own
d → m down-projection, routes in m and maps the routed bottleneck up m → r once;
``separate_mapping="split"`` gives x_H and x_R each their own d → m → r chain and routes in r
(Fig. A1(d); the reference code's ``MergedLinearSplitMerge`` / ``MergedLinearSplit``).

**Routing by composition.** A routing function is a small module (:class:`Routing`) that every
bottleneck method *uses*: ``routing`` / ``separate_mapping`` / ``visual_dim`` are fields of
:class:`RoutableConfig`, which LoRA, Adapter, Null-LoRA and FLoRA-linear configs inherit. The method
computes its own x_t (its bottleneck of x_H) and gives the routing module the function that maps x_R
the same way (or its separate mapping); the routed bottleneck replaces the plain one. So a routed
LoRA's whole branch is (α/r)·B·route(A·x, A·x_R) — the plain B·A·x term is not added — and a routed
Adapter routes its down-projections (bias included) before the activation.

**x_R belongs to the model, not to the process.** Each adapted layer holds its own x_R
(``layer.routing_input``). :func:`set_routing_inputs` sets it on the layers of one module (one
tensor, or a dict of module paths relative to that module → tensors; the longest prefix wins,
``""`` covers all) until the next call; :func:`routing_inputs` does the same for a ``with`` block and
clears on exit. The VL models set their own layers' x_R inside ``forward`` (the decoder's as soon as
the encoder output exists), so the backward after a forward, gradient-checkpointing recomputes
included, sees it; two models in one thread never see each other's. When the text batch is B·k
(beam search) and x_R has B rows, each row is repeated k times, as generation expands inputs.
A layer called several times in one forward with different x_R would be recomputed with the last
one under gradient checkpointing: the VL models call each routed layer once per forward.

GPT-2's fused ``c_attn`` with LoRA ``slices``: routing acts on each adapted projection's own
bottleneck (q and v separately). The official Routing_VLPEFT code routes over the concatenated q|v
bottleneck, which lets ``proj``/``expand`` mix q and v components; ours keeps them independent.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check
from .base import (
    BASE_ROWS,
    AdaptedLayer,
    MethodConfig,
    RowAdapters,
    adapted_layers,
    adapter_configs,
    in_backward,
    matches_targets,
    set_layer_context,
)

BASE_KINDS = ("mul", "add", "proj", "expand")
KINDS = BASE_KINDS + tuple(f"relu_{k}" for k in BASE_KINDS)
CROSS_ATTENTION = "cross_attention"  # an alignment with parameters, not a routing function
ALIGNMENTS = KINDS + (CROSS_ATTENTION,)
MAPPINGS = ("merge", "split")
VISUAL_TOKENS = ("mean", "all")
TOKEN_KINDS = ("proj", "relu_proj")  # the functions defined on several visual tokens


def compute_dtype(x: torch.Tensor, parameter_dtype: torch.dtype) -> torch.dtype:
    """The dtype a bottleneck GEMM of ``x`` with float32 parameters runs in: autocast's when it is
    on for x's device, else the parameters' (what ``F.linear`` would do; the fused adapter paths
    cast once to it and compute their gradients back in the parameters' dtype)."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and parameter_dtype == torch.float32:
        return torch.get_autocast_dtype(device)
    return parameter_dtype


def route(kind: str, x_t: torch.Tensor, x_v: torch.Tensor, pool: bool = True) -> torch.Tensor:
    """Applies routing function ``kind`` to x_t (..., L, r) and x_v (..., r) or (..., K, r).

    Args:
        kind: the routing function.
        x_t: the text bottleneck.
        x_v: the visual bottleneck: one vector, or K tokens.
        pool: mean-pool K visual tokens to one vector first; False keeps them (``proj`` and
            ``relu_proj`` only: x_t X_vᵀ X_v).

    Example:
        >>> x_t, x_v = torch.ones(2, 3, 4), torch.full((2, 4), 2.0)
        >>> route("proj", x_t, x_v)[0, 0]
        tensor([16., 16., 16., 16.])
    """
    if kind not in KINDS:
        raise ValueError(f"unknown routing function {kind!r}; choose one of {list(KINDS)}")
    if x_v.dim() == x_t.dim():  # several visual tokens
        if not pool:
            return _route_tokens(kind, x_t, x_v)
        x_v = x_v.mean(dim=-2)  # average-pool to one vector
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


def _route_tokens(kind: str, x_t: torch.Tensor, x_v: torch.Tensor) -> torch.Tensor:
    """x_t X_vᵀ X_v (or ReLU(x_t) ReLU(X_v)ᵀ X_v) over K visual tokens X_v (..., K, r)."""
    if kind not in TOKEN_KINDS:
        raise ValueError(
            f"routing function {kind!r} is defined on one visual vector: with "
            f"visual_tokens='all' (no pooling) use one of {list(TOKEN_KINDS)}"
        )
    t, v = (F.relu(x_t), F.relu(x_v)) if kind == "relu_proj" else (x_t, x_v)
    return (t @ v.transpose(-1, -2)) @ x_v


@dataclasses.dataclass
class RoutableConfig(MethodConfig):
    """Fields of every bottleneck method (LoRA, Adapter, Null-LoRA, FLoRA-linear).

    Args:
        routing: a routing function (``"mul"``, ``"add"``, ``"proj"``, ``"expand"``,
            ``"relu_proj"``, ...) in the bottleneck, or ``"cross_attention"`` (trainable
            query/key/value mappings, softmax over x_R's tokens; LoRA and Adapter); None: the
            plain method.
        separate_mapping: x_R gets its own down-projection instead of sharing the text one:
            ``"merge"`` (True means this) routes in the narrow width and maps up once, ``"split"``
            (LoRA) gives x_H and x_R each a d → m → r chain and routes in r; False: shared.
        visual_dim: width of x_R with ``separate_mapping`` or cross-attention (default: the
            bottleneck's input width).
        visual_tokens: ``"mean"`` pools several x_R tokens to one vector (default); ``"all"``
            keeps them: x_t X_vᵀ X_v (``proj``/``relu_proj``, Qu et al. Sec. 4.3).
        attention_heads: heads of ``routing="cross_attention"`` (the reference code's 4).
        route_targets: the targets whose adapters route (names/suffixes, or one regex, like
            ``targets``); the other targets get the plain method. None: all of them. This makes
            CLIP-BART's setting — adapters in encoder and decoder, routing in the decoder only
            (Qu et al. Sec. 5.1, Fig. 6) — one adapter set.
    """

    routing: str | None = None
    separate_mapping: bool | str = False
    visual_dim: int | None = None
    route_targets: list[str] | str | None = None
    visual_tokens: str = "mean"
    attention_heads: int = 4

    # methods whose config has the d → m → r chain that separate_mapping="split" duplicates
    split_mapping: ClassVar[bool] = False
    cross_attention: ClassVar[bool] = False  # methods that build routing="cross_attention"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        alignments = ALIGNMENTS if self.cross_attention else KINDS
        if self.routing is not None and self.routing not in alignments:
            raise ValueError(
                f"{name}.routing must be one of {list(alignments)} or None, got {self.routing!r}"
            )
        self.separate_mapping = _mapping(name, self.separate_mapping, self.split_mapping)
        if self.separate_mapping and not self.routing:
            raise ValueError(f"{name}.separate_mapping needs a routing function")
        if self.separate_mapping and self.routing == CROSS_ATTENTION:
            raise ValueError(
                f"{name}.separate_mapping: cross-attention maps x_R with its own key/value "
                "mappings already; leave separate_mapping False"
            )
        if self.visual_dim is not None and not (
            self.separate_mapping or self.routing == CROSS_ATTENTION
        ):
            raise ValueError(
                f"{name}.visual_dim is the width of a separate mapping's or cross-attention's "
                "input (x_R)"
            )
        check(self.visual_tokens in VISUAL_TOKENS, f"{name}.visual_tokens",
              f"one of {list(VISUAL_TOKENS)}", self.visual_tokens)  # fmt: skip
        if self.visual_tokens == "all" and self.routing not in TOKEN_KINDS:
            raise ValueError(
                f"{name}.visual_tokens='all' needs routing in {list(TOKEN_KINDS)} (the functions "
                f"defined on several visual tokens), got {self.routing!r}"
            )
        if not isinstance(self.attention_heads, int) or self.attention_heads < 1:
            raise ValueError(
                f"{name}.attention_heads must be an int >= 1, got {self.attention_heads!r}"
            )
        if self.route_targets is not None and not self.routing:
            raise ValueError(f"{name}.route_targets needs a routing function")
        if isinstance(self.route_targets, tuple):
            self.route_targets = list(self.route_targets)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax attention without projections: q (..., L, D) over k, v (..., K, D),
    D split into ``heads`` equal parts, scaled by 1/√(D/heads); returns (..., L, D). The
    cross-attention alignment of LoRA and Adapter (the methods own the q/k/v/o mappings)."""

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (heads, -1)).transpose(-2, -3)  # (..., H, L, D/H)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(-2, -3).flatten(-2)


def _mapping(name: str, value: bool | str | None, split: bool) -> bool | str:
    """``separate_mapping`` normalised: False, ``"merge"`` (what True meant) or ``"split"``."""
    if value is None or value is False:
        return False
    if value is True:
        return "merge"
    if value not in MAPPINGS:
        raise ValueError(
            f"{name}.separate_mapping must be False, True (= 'merge'), 'merge' or 'split', "
            f"got {value!r}"
        )
    if value == "split" and not split:
        raise ValueError(
            f"{name}.separate_mapping='split' duplicates a d → m → r chain, which only LoRA has "
            "(mapping_rank); use 'merge' (x_R's own down-projection)"
        )
    return value


class Routing(nn.Module):
    """The routing function of one adapter: ``forward(x_t, layer, map_visual)`` routes the
    method's bottleneck x_t (..., L, G·r) with x_v = ``map_visual``(x_R of ``layer``).

    Args:
        kind: the routing function.
        layer_name: for error messages.
        visual_dim: the width ``map_visual`` expects (x_R's width is checked against it).
        groups: independent bottlenecks in the last dimension (LoRA slices), routed separately.
        separate: how the method maps x_R with its own parameters (``separate_mapping``:
            False, ``"merge"`` or ``"split"``).
        pool: mean-pool several x_R tokens first (``visual_tokens="mean"``).

    With ``kind="cross_attention"`` the method computes the alignment itself and uses this
    module for x_R only (:meth:`x_r`); a task's routing function does not switch it.
    """

    def __init__(
        self,
        kind: str,
        layer_name: str,
        visual_dim: int,
        groups: int = 1,
        separate: bool | str = False,
        pool: bool = True,
    ) -> None:
        super().__init__()
        self.kind = self.configured_kind = kind
        self.layer_name, self.visual_dim, self.groups = layer_name, visual_dim, groups
        self.separate, self.pool = separate, pool
        self.seen_version: int | None = None  # see _check_fresh

    def x_r(self, layer: AdaptedLayer, batch: int) -> torch.Tensor:
        """x_R of ``layer`` for a text batch of ``batch`` rows (beam-expanded when no grad)."""
        x_r = layer.routing_input
        if x_r is None:
            raise RuntimeError(
                f"routed layer {self.layer_name!r} was called without x_R: set it with "
                "`vlpeft.set_routing_inputs(model, x_r)` or run the forward inside "
                "`with vlpeft.routing_inputs(model, x_r):` (vlpeft VL models do this)"
            )
        self._check_fresh(layer)
        if x_r.shape[-1] != self.visual_dim:
            raise ValueError(
                f"routed layer {self.layer_name!r} maps x_R with a ({self.visual_dim} → r) matrix "
                f"but x_R has dim {x_r.shape[-1]}: use separate_mapping='merge' with "
                f"visual_dim={x_r.shape[-1]}, or route only layers whose input width equals x_R's"
            )
        if x_r.shape[0] != batch:
            if batch % x_r.shape[0] or torch.is_grad_enabled():
                raise ValueError(
                    f"{self.layer_name}: text batch {batch} does not match the x_R batch "
                    f"{x_r.shape[0]} (rows are repeated per beam only in generation, without grad; "
                    "give one x_R row per text row)"
                )
            x_r = x_r.repeat_interleave(batch // x_r.shape[0], dim=0)
        return x_r

    def _check_fresh(self, layer: AdaptedLayer) -> None:
        """A recompute during backward must see the x_R its forward saw: a forward of the model
        without grad in between (a generate for a metric) sets another x_R and would silently give
        wrong gradients, so it is an error. (Two forwards *with* grad before one backward are the
        caller's to avoid, as for any module state under checkpointing. Not checked inside a
        compiled graph: torch.compile guards its own inputs.)"""
        if torch.compiler.is_compiling():
            return
        if not in_backward():
            if torch.is_grad_enabled():
                self.seen_version = layer.routing_version
        elif self.seen_version is not None and self.seen_version != layer.routing_version:
            raise RuntimeError(
                f"routed layer {self.layer_name!r}: x_R was set again between the forward and its "
                "gradient-checkpointing recompute (another forward of this model ran before "
                "backward); run backward before the next forward"
            )

    def forward(
        self,
        x_t: torch.Tensor,
        layer: AdaptedLayer,
        map_visual: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        if self.configured_kind == CROSS_ATTENTION:
            raise RuntimeError(f"{self.layer_name}: cross-attention is computed by its method")
        squeezed = x_t.dim() == 2  # (B, r): one token per example
        tokens = x_t.unsqueeze(1) if squeezed else x_t
        x_v = map_visual(self.x_r(layer, tokens.shape[0]).to(tokens.dtype))
        if self.groups == 1:
            routed = route(self.kind, tokens, x_v, self.pool)
        else:
            s = (self.groups, tokens.shape[-1] // self.groups)
            routed = route(
                self.kind,
                tokens.unflatten(-1, s).transpose(-2, -3),  # (B, G, L, r)
                x_v.unflatten(-1, s).movedim(-2, 1),  # (B, G, r) or (B, G, K, r)
                self.pool,
            )
            routed = routed.transpose(-2, -3).flatten(-2)  # back to (B, L, G·r)
        return routed.squeeze(1) if squeezed else routed

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, groups={self.groups}, separate={self.separate!r}, "
            f"pool={self.pool}"
        )


def make_routing(
    config: MethodConfig, layer_name: str, input_dim: int, groups: int = 1
) -> Routing | None:
    """The :class:`Routing` a bottleneck method builds from its config (None when not routed).
    ``input_dim`` is the width the method's own mapping reads; a separate mapping reads
    ``config.visual_dim`` (default: the same width)."""
    kind = getattr(config, "routing", None)
    if not kind:
        return None
    route_targets = getattr(config, "route_targets", None)
    if route_targets is not None and not matches_targets(layer_name, route_targets):
        return None  # a target of the set that takes the plain method
    own = config.separate_mapping or kind == CROSS_ATTENTION  # x_R has its own mapping
    visual_dim = (config.visual_dim or input_dim) if own else input_dim
    pool = config.visual_tokens == "mean"
    return Routing(kind, layer_name, visual_dim, groups, config.separate_mapping, pool)


# -- x_R of a module --------------------------------------------------------------------------------
def set_routing_inputs(
    module: nn.Module, x_r: torch.Tensor | dict[str, torch.Tensor] | None
) -> None:
    """Sets x_R on the adapted layers of ``module`` until the next call (None clears).

    Args:
        module: the model (or any submodule) whose layers route.
        x_r: one tensor (B, d) or (B, K, d) for every layer, or a dict mapping module paths relative
            to ``module`` (as ``module.named_modules()`` names them) to such tensors; the longest
            matching prefix wins and ``""`` matches every layer. Layers no key covers are cleared.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = vlpeft.add_adapter(net, vlpeft.LoRAConfig(targets=["0"], r=2, routing="mul"))
        >>> vlpeft.set_routing_inputs(net, torch.randn(3, 4))
        >>> net(torch.randn(3, 5, 4)).shape
        torch.Size([3, 5, 4])
    """
    for layer in set_layer_context(module, "routing_input", x_r):
        layer.routing_version += 1


def routing_inputs(
    module: nn.Module, x_r: torch.Tensor | dict[str, torch.Tensor] | None = None
) -> contextlib.AbstractContextManager[None]:
    """x_R for the routed layers of ``module`` during the ``with`` block (forward and backward
    inside it see it); on exit each layer's previous x_R is restored. Same ``x_r`` forms as
    :func:`set_routing_inputs`.

    x_R belongs to a model, never to the process: the module-less ``routing_inputs(x_r)`` of
    earlier versions is a TypeError naming the per-model call.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = vlpeft.add_adapter(net, vlpeft.LoRAConfig(targets=["0"], r=2, routing="add"))
        >>> with vlpeft.routing_inputs(net, torch.randn(3, 4)):
        ...     y = net(torch.randn(3, 5, 4))
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"routing_inputs takes the module whose layers route, got a {type(module).__name__}: "
            "x_R belongs to a model, not to the process (the module-less routing_inputs(x_r) was "
            "removed); use `vlpeft.routing_inputs(model, x_r)` for a block or "
            "`vlpeft.set_routing_inputs(model, x_r)`"
        )
    return _routing_block(module, x_r)


@contextlib.contextmanager
def _routing_block(module: nn.Module, x_r: torch.Tensor | dict | None) -> Iterator[None]:
    layers = [layer for _, layer in adapted_layers(module)]
    previous = [layer.routing_input for layer in layers]
    set_routing_inputs(module, x_r)
    try:
        yield
    finally:
        for layer, value in zip(layers, previous):
            layer.routing_input = value
            layer.routing_version += 1


# -- switching ---------------------------------------------------------------------------------------
def _active_routings(module: nn.Module) -> Iterator[tuple[str, Routing]]:
    for path, layer in adapted_layers(module):
        for name in layer.active:
            adapter = layer.adapters[name] if name in layer.adapters else None
            if adapter is not None and adapter.routing is not None:
                yield path, adapter.routing


def routed_layers(module: nn.Module) -> list[str]:
    """Names of the layers in ``module`` whose active adapters are routed (they need x_R)."""
    return list(dict.fromkeys(path for path, _ in _active_routings(module)))


def set_routing(module: nn.Module, kind: str | None) -> int:
    """Switches the routing function of every active routed adapter in ``module`` to ``kind``
    (None: back to each adapter's configured function).

    Returns the number of adapters switched (a task router calls this per task, so a task that
    names no routing function runs the configured one, not the previous task's).
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown routing function {kind!r}; choose one of {list(KINDS)}")
    switched = 0
    for _, routing in _active_routings(module):
        if routing.configured_kind == CROSS_ATTENTION:
            continue  # an alignment with its own parameters, not a switchable function
        routing.kind = kind or routing.configured_kind
        switched += 1
    return switched


# -- mixed-task batches ------------------------------------------------------------------------------
def set_row_adapters(
    module: nn.Module,
    names: Sequence[str | Sequence[str]] | None,
    routings: Sequence[str | None] | None = None,
) -> None:
    """One adapter set per row of the next forwards of ``module`` (peft's ``adapter_names=``),
    until the next call; None clears it (the active adapters apply to every row again).

    Each adapted layer groups the rows by (adapter set, routing function), runs each group through
    that set's adapters with the group's x_R and token-mask rows, and scatters the results back:
    a row gets what it gets alone with its set active. The VL models call this in ``forward`` and
    ``generate`` from ``batch["adapter_names"]`` and ``batch["routings"]``.

    Args:
        module: the model whose layers adapt.
        names: per row an adapter name (or several, applied in order), or ``"__base__"`` for the
            base model; a text batch of k·B rows (beams) repeats each row's set k times.
        routings: per row the routing function of the set's routed adapters (a task's
            ``routing``); None, or a None entry: each adapter's configured function.

    Raises:
        KeyError: a name that is no adapter of ``module``.
        ValueError: ``routings`` of another length than ``names``, or an unknown function.
        RuntimeError: merged adapters (a merged ΔW is in every row's base weight).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> for name in ("a", "b"):
        ...     _ = vlpeft.add_adapter(net, vlpeft.LoRAConfig(targets=["0"], r=2), name)
        >>> vlpeft.set_row_adapters(net, ["a", "b", "__base__"])
        >>> net(torch.randn(3, 4)).shape
        torch.Size([3, 4])
    """
    if names is None:
        set_layer_context(module, "row_adapters", None)
        return
    rows = tuple((n,) if isinstance(n, str) else tuple(n) for n in names)
    known = adapter_configs(module)
    for row in rows:
        for n in row:
            if n != BASE_ROWS and n not in known:
                raise KeyError(
                    f"adapter_names: no adapter named {n!r}; this module has {sorted(known)}"
                )
    rows = tuple(tuple(n for n in row if n != BASE_ROWS) for row in rows)
    kinds = tuple(routings) if routings is not None else (None,) * len(rows)
    if len(kinds) != len(rows):
        raise ValueError(
            f"routings: {len(kinds)} entries for {len(rows)} adapter_names (one per row)"
        )
    for kind in kinds:
        if kind is not None and kind not in KINDS:
            raise ValueError(
                f"routings: unknown routing function {kind!r}; choose one of {list(KINDS)}"
            )
    for path, layer in adapted_layers(module):
        if layer.merged:
            raise RuntimeError(
                f"{path}: adapters {list(layer.merged)} are merged into the base weights: a "
                "mixed-task batch (adapter_names) needs them unmerged (vlpeft.unmerge_adapter)"
            )
    set_layer_context(module, "row_adapters", RowAdapters(rows, kinds))
