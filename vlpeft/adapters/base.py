"""The adapter core: the layer protocol every PEFT method implements, and module traversal.

Every injected layer is an :class:`AdaptedLayer`: it keeps the original module as ``.base_layer``
(frozen) and holds one :class:`AdapterModule` per named adapter. Each method (one file in this
package, importing only this core and :mod:`.routing`) contributes a config dataclass, registered
in :data:`METHODS`, whose ``build`` makes the adapter module for one target layer.

An adapter module transforms the base layer's output: ``forward(base_layer, x, y, layer) -> y'``
with ``x`` the base layer's input, ``y`` its output and ``layer`` the :class:`AdaptedLayer` calling
it, which carries the *forward context* of this layer — nothing about a forward is process-global:

- ``layer.routing_input``: x_R of the routed adapters, set by the model that owns the layer
  (:func:`vlpeft.set_routing_inputs`) and kept until its next forward, so a backward after the
  forward, including a gradient-checkpointing recompute, sees the same x_R;
- ``layer.token_mask``: which positions of this layer's input are real (ReSoRA's samples);
- ``layer.recorder``: ReSoRA's recorder when enabled; ``layer.record(adapter, z, b)`` hands it the
  rank-1 components of a call (training mode with grad only, never a recompute);
- ``layer.row_adapters``: a mixed-task batch (peft's ``adapter_names=``): one adapter set (and
  routing function) per row instead of ``active`` (:func:`vlpeft.set_row_adapters`).

``layer.disabled`` (:func:`disable_adapters`) makes the layer compute its base layer only.

A mergeable method gives ``delta_weight`` (the dense ΔW in the base weight's shape); a
LoRA-reducible one gives ``lora_factors`` (A, B) with ΔW = B·A, from which the base class builds
``delta_weight`` and ``peft_tensors`` (what the peft export writes), so only a method whose ΔW is
not B·A (DoRA, FLoRA on a conv) writes its own; ``weight_components`` gives the weight-level
rank-1 components ReSoRA can penalise.

Code outside a method's file asks the method, never its name: ``supports_slices``,
``deepspeed_problem(zero_stage)``, ``peft_flags``/``peft_layer_tensors`` on the config class;
``peft_tensors(base_layer)``, ``peft_flags``, ``slice_spec`` and ``factor_scale`` on the adapter
module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import Config, ConfigError, check_finite
from ..registry import Registry, nearest_hint

METHODS: Registry = Registry("method", attribute="method")
register_method = METHODS.register
list_methods = METHODS.names
get_method = METHODS.get

__all__ = [
    "METHODS",
    "AdaptedLayer",
    "AdapterModule",
    "MethodConfig",
    "adapted_layers",
    "adapter_configs",
    "BASE_ROWS",
    "by_longest_prefix",
    "disable_adapters",
    "gathered",
    "get_method",
    "in_backward",
    "is_conv1d",
    "linear_shape",
    "list_methods",
    "matches_targets",
    "nearest_hint",
    "register_method",
]


# -- base-layer shapes ------------------------------------------------------------------------------
def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (y = x·W + b, W of shape (in, out)), without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def factory_kwargs(module: nn.Module) -> dict[str, Any]:
    """``dtype``/``device`` of a module's first parameter, for building adapter tensors beside it."""
    weight = next(module.parameters(), None)
    return {"dtype": weight.dtype, "device": weight.device} if weight is not None else {}


# -- configs ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class MethodConfig(Config):
    """Fields every method shares.

    Args:
        targets: module-name suffixes (``["q_proj", "v_proj"]`` matches ``...attn.q_proj``), or one
            regex string matched against the whole dotted module name.
        trainable: extra parameter-name regexes (searched in the full name) that stay trainable:
            LayerNorms, heads, a visual projection. Everything else but the adapters is frozen.
    """

    targets: list[str] | str = dataclasses.field(default_factory=list)
    trainable: list[str] = dataclasses.field(default_factory=list)

    method: ClassVar[str] = ""
    # which default module kinds of a backbone family the method takes (``VLModel.default_kinds``):
    # "lora" — the projections (q, v); "adapter" — the sublayer outputs (o, ffn_out)
    placement: ClassVar[str] = "lora"
    # whether the method adapts chosen equal parts of a fused projection's output (a ``slices``
    # field): a backbone with a fused q|k|v asks before placing q and v alone
    supports_slices: ClassVar[bool] = False
    # whether the config has ``r`` and ``alpha`` that LayerwiseConfig may set per layer
    layerwise_rank: ClassVar[bool] = False
    # how a peft LoRA checkpoint of this method looks (vlpeft.load_peft_lora): the peft
    # ``LoraConfig`` flags that select it (None: no peft checkpoint loads as this method), and each
    # layer's tensors, by their suffix in the file, → the adapter module's tensor they load into
    peft_flags: ClassVar[dict[str, Any] | None] = None
    peft_layer_tensors: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        check_finite(self)  # before any range check: NaN passes `not x < 0`
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if not self.targets:
            raise ValueError(f"{type(self).__name__}.targets is empty: name the modules to adapt")
        if isinstance(self.trainable, str):
            self.trainable = [self.trainable]
        self.trainable = list(self.trainable)

    def build(self, base_layer: nn.Module, layer_name: str) -> AdapterModule:
        """The adapter module of this method for one target layer."""
        raise NotImplementedError

    def after_injection(self, adapters: dict[str, AdapterModule]) -> None:
        """Called by ``add_adapter`` with every layer path → adapter built (a method may report
        or refuse what it built); nothing by default."""

    def deepspeed_problem(self, zero_stage: int) -> str | None:
        """Why this method cannot train under DeepSpeed ZeRO stage ``zero_stage`` (a sentence the
        launcher puts in its error), or None when it can; None by default.

        Example:
            >>> from vlpeft import DoRAConfig, LoRAConfig
            >>> LoRAConfig(targets=["q"]).deepspeed_problem(3), DoRAConfig(targets=["q"]).deepspeed_problem(2)
            (None, None)
        """
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "adapter config") -> MethodConfig:
        """Builds the config of ``data["method"]`` (or of ``cls`` when called on a method class)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        method = data.pop("method", None) or cls.method
        if not method:
            raise ConfigError(f"{where}: missing key 'method' (one of {list_methods()})")
        config_cls = get_method(method)  # an unknown name: KeyError naming the nearest method
        return Config.from_dict.__func__(config_cls, data, f"{where} (method {method!r})")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# -- the layer protocol -----------------------------------------------------------------------------
class AdapterModule(nn.Module):
    """One method's adapter on one layer. Subclasses set ``mergeable`` and implement ``forward``.

    ``routing`` is the adapter's routing function (a :class:`vlpeft.adapters.routing.Routing`) when
    its config names one; a routed adapter is neither mergeable nor LoRA-reducible.
    """

    mergeable: bool = False
    lora_reducible: bool = False
    records: bool = True  # hands its rank-1 components to ReSoRA (layer.record)

    def __init__(self) -> None:
        super().__init__()
        self.routing: nn.Module | None = None  # an instance entry: a class attribute would hide it

    def forward(
        self, base_layer: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer
    ) -> torch.Tensor:
        raise NotImplementedError

    @property
    def rank(self) -> int:
        raise NotImplementedError

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """Dense ΔW in the base weight's shape (mergeable methods only). Default: B·A from
        :meth:`lora_factors` of a LoRA-reducible adapter — (out, in) for a Linear, (in, out) for a
        Conv1D, (out, in, kh, kw) for a Conv2d (A a conv to r channels, B a 1×1 conv); a method
        whose ΔW is not B·A (DoRA, FLoRA on a conv) overrides it."""
        if not self.lora_reducible:
            raise TypeError(
                f"{type(self).__name__} is not mergeable: its update is not a weight delta"
            )
        a, b = self.lora_factors(base_layer)
        delta = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])
        return delta.T if is_conv1d(base_layer) else delta

    def merge_into(self, base_layer: nn.Module) -> None:
        """Folds this adapter into ``base_layer``'s weight (called without grad). Default: W += ΔW.
        A method whose ΔW depends on W0 (DoRA) overrides this pair and keeps what it needs."""
        weight = base_layer.weight
        weight.add_(self.delta_weight(base_layer).to(weight.dtype))

    def unmerge_from(self, base_layer: nn.Module) -> None:
        """Undoes :meth:`merge_into` (called without grad, in reverse merge order)."""
        weight = base_layer.weight
        weight.sub_(self.delta_weight(base_layer).to(weight.dtype))

    def lora_factors(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in peft's shapes with the scale folded in: ΔW = B·A (LoRA-reducible methods)."""
        raise TypeError(f"{type(self).__name__} cannot be written as a plain LoRA")

    @property
    def factor_scale(self) -> float:
        """The scale s that :meth:`lora_factors` folded into B, which peft's factor merges weigh
        the factors by (``merge_task_adapters``' ``linear``, ``ties``, …): LoRA's α/r; 1 for a
        method whose factors carry their own scale (Null-LoRA, FLoRA)."""
        return 1.0

    # peft ``LoraConfig`` flags an export of this adapter sets (DoRA: ``use_dora``)
    peft_flags: ClassVar[dict[str, Any]] = {}

    def peft_tensors(self, base_layer: nn.Module) -> dict[str, torch.Tensor] | None:
        """This layer in a peft LoRA checkpoint: tensor suffix after the layer's name
        (``lora_A.weight``, ``lora_B.weight``, …) → tensor, the scale folded into B (peft's α = r);
        None when the update cannot be written so (nonlinear, or input-dependent). Default: the
        :meth:`lora_factors` of a LoRA-reducible adapter."""
        if not self.lora_reducible:
            return None
        a, b = self.lora_factors(base_layer)
        return {"lora_A.weight": a, "lora_B.weight": b}

    @property
    def slice_spec(self) -> dict | None:
        """``{"parts": P, "use": [i, ...]}`` when the adapter covers only those equal parts of a
        fused projection's output (LoRA ``slices``; saved with a checkpoint), else None."""
        return None

    def weight_components(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(Aᵀ (d_in, r), B (d_out, r)) of the weight-level rank-1 components ΔW = Σ_i b_i a_iᵀ."""
        a, b = self.lora_factors(base_layer)
        return a.flatten(1).T, b.flatten(1)


def in_backward() -> bool:
    """True while autograd runs a backward pass: a forward there is a gradient-checkpointing
    recompute of a call that already ran. (Non-reentrant checkpointing records the first forward;
    reentrant checkpointing runs it without grad, so nothing can be recorded: the recorder counts
    those calls and the penalty says so.)"""
    return torch._C._current_graph_task_id() != -1


def _map_first(y: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Applies ``fn`` to a module output, or to the first element of a tuple output."""
    if isinstance(y, torch.Tensor):
        return fn(y)
    if isinstance(y, tuple) and y and isinstance(y[0], torch.Tensor):
        return (fn(y[0]), *y[1:])
    raise TypeError(f"cannot adapt a module output of type {type(y).__name__}")


BASE_ROWS = "__base__"  # peft's name for the rows of a mixed batch that take no adapter


@dataclasses.dataclass(frozen=True)
class RowAdapters:
    """A mixed-task batch's forward context: per row the adapter names applied (in order) and the
    routing function of its routed adapters (None: each adapter's configured one)."""

    names: tuple[tuple[str, ...], ...]
    kinds: tuple[str | None, ...]

    @functools.cached_property
    def groups(self) -> dict[tuple[tuple[str, ...], str | None], torch.Tensor]:
        """(names, routing function) → the rows that take them, in first-seen order."""
        groups: dict[tuple[tuple[str, ...], str | None], list[int]] = {}
        for i, key in enumerate(zip(self.names, self.kinds)):
            groups.setdefault(key, []).append(i)
        return {key: torch.tensor(rows) for key, rows in groups.items()}


def _expand_rows(index: torch.Tensor, repeat: int, device: torch.device) -> torch.Tensor:
    """Row indices of a batch whose rows are each repeated ``repeat`` times consecutively (beams
    in generation, the images of an NLVR² example), as ``repeat_interleave`` expands them."""
    index = index.to(device)
    if repeat == 1:
        return index
    return (index[:, None] * repeat + torch.arange(repeat, device=device)).flatten()


class AdaptedLayer(nn.Module):
    """Wraps an original layer and applies the active named adapters to its output.

    Attributes:
        base_layer: the original module, frozen.
        adapters: ``nn.ModuleDict`` of adapter name → :class:`AdapterModule`.
        active: names applied in the forward, in order.
        merged: names whose ΔW is currently folded into ``base_layer``'s weight.
        routing_input, token_mask, recorder: this layer's forward context (module docstring).
    """

    def __init__(self, base_layer: nn.Module, layer_name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.layer_name = layer_name
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()
        self.routing_input: torch.Tensor | None = None
        self.routing_version = 0  # bumped by each set_routing_inputs (stale-x_R check)
        self.token_mask: torch.Tensor | None = None
        self.recorder = None
        self.row_adapters: RowAdapters | None = None
        self.disabled = False

    _CONTEXT = ("routing_input", "token_mask", "recorder", "row_adapters")

    def __getstate__(self) -> dict[str, Any]:
        # a copy (deepcopy for an EMA or best-model copy, pickling) starts without the forward
        # context: x_R and masks hold the last forward's graph, the recorder belongs to the original
        state = dict(super().__getstate__())
        state.update(dict.fromkeys(self._CONTEXT))
        return state

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters.keys())

    def _adapter(self, name: str | None) -> AdapterModule:
        if name is None:
            names = [n for n in self.active if n in self.adapters] or self.adapter_names
            if len(names) != 1:
                raise ValueError(f"{self.layer_name}: name one adapter of {self.adapter_names}")
            name = names[0]
        if name not in self.adapters:
            raise KeyError(f"{self.layer_name}: no adapter {name!r}; has {self.adapter_names}")
        return self.adapters[name]

    @property
    def mergeable(self) -> bool:
        return all(self.adapters[n].mergeable for n in self.active if n in self.adapters)

    @property
    def rank(self) -> int:
        return self._adapter(None).rank

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """Dense ΔW of adapter ``name`` (default: the one active adapter) in the base weight's shape."""
        return self._adapter(name).delta_weight(self.base_layer)

    # -- the forward context -------------------------------------------------------------------
    @property
    def recording(self) -> bool:
        """Whether this call's components go to ReSoRA: a recorder is attached, the layer is in
        training mode with grad enabled, and this is not a recompute during backward."""
        return (
            self.recorder is not None
            and self.training
            and torch.is_grad_enabled()
            and not in_backward()
        )

    def record(self, adapter: AdapterModule, z: torch.Tensor, b: torch.Tensor) -> None:
        """Hands the rank-1 components Δh_i = b_i z_i of one call to the recorder (if recording).

        Args:
            adapter: the adapter that made them.
            z: (..., r) bottleneck activations; their leading shape must be the token mask's.
            b: (d_out, r) up-projection columns, scale included.
        """
        if not self.recording:
            return
        mask = self.token_mask
        if mask is not None and tuple(mask.shape) != tuple(z.shape[:-1]):
            raise ValueError(
                f"{self.layer_name}: the token mask set for this layer has shape "
                f"{tuple(mask.shape)} but its activations are {tuple(z.shape[:-1])} positions: "
                "the model set the mask of another sequence (set_token_masks)"
            )
        self.recorder.add(self, adapter, z, b, mask)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        y = self.base_layer(*args, **kwargs)
        if self.disabled:
            return y
        if self.row_adapters is not None:
            return self._mixed_forward(args[0] if args else next(iter(kwargs.values())), y)
        pending = [n for n in self.active if n in self.adapters and n not in self.merged]
        if not pending:
            return y
        if self.recorder is not None and self.training and not torch.is_grad_enabled():
            self.recorder.missed += 1  # e.g. reentrant checkpointing's grad-free first forward
        x = args[0] if args else next(iter(kwargs.values()))
        for name in pending:
            adapter = self.adapters[name]
            y = _map_first(y, lambda out, a=adapter: a(self.base_layer, x, out, self))
        return y

    def _mixed_forward(self, x: torch.Tensor, y: Any) -> Any:
        """peft's ``_mixed_batch_forward``: the rows of each (adapter set, routing function) group
        go through that set's adapters alone, with their own x_R and token mask rows, and are
        scattered back into the base output; rows of :data:`BASE_ROWS` keep the base output."""
        if self.merged:
            raise RuntimeError(
                f"{self.layer_name}: adapters {list(self.merged)} are merged into the base weight: "
                "a mixed-task batch needs unmerged adapters (vlpeft.unmerge_adapter first)"
            )
        rows = self.row_adapters
        n = len(rows.names)
        if x.shape[0] % n:
            raise ValueError(
                f"{self.layer_name}: {x.shape[0]} input rows for {n} adapter_names (one per row, "
                "repeated per beam or image)"
            )
        repeat = x.shape[0] // n
        for (names, kind), index in rows.groups.items():
            adapters = [self.adapters[a] for a in names if a in self.adapters]
            if not adapters:
                continue
            rows_x = _expand_rows(index, repeat, x.device)
            with self._row_context(index, rows_x, adapters, kind):
                y = _map_first(y, functools.partial(self._rows_through, adapters, x, rows_x))
        return y

    def _rows_through(
        self, adapters: list[AdapterModule], x: torch.Tensor, rows: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """``y`` with its ``rows`` replaced by ``adapters`` applied to them in order."""
        sub, x_sub = y.index_select(0, rows), x.index_select(0, rows)
        for adapter in adapters:
            sub = adapter(self.base_layer, x_sub, sub, self)
        return y.index_copy(0, rows, sub)

    @contextlib.contextmanager
    def _row_context(self, index, rows_x, adapters, kind):
        """x_R, token mask and routing function of one group's rows for the duration."""
        saved = (self.routing_input, self.token_mask)
        routings = [a.routing for a in adapters if a.routing is not None]
        kinds = [r.kind for r in routings]
        n = len(self.row_adapters.names)

        def rows_of(t: torch.Tensor | None) -> torch.Tensor | None:
            # one row per example (x_R; a mask in generation) or per input row (beams, images)
            if t is None or t.shape[0] not in (n, len(rows_x)):
                return t
            return t.index_select(0, (index if t.shape[0] == n else rows_x).to(t.device))

        self.routing_input, self.token_mask = rows_of(saved[0]), rows_of(saved[1])
        for routing in routings:
            routing.kind = kind or routing.configured_kind
        try:
            yield
        finally:
            self.routing_input, self.token_mask = saved
            for routing, old in zip(routings, kinds):
                routing.kind = old

    @torch.no_grad()
    def merge(self) -> None:
        for name in self.active:
            if name in self.adapters and name not in self.merged:
                self.adapters[name].merge_into(self.base_layer)
                self.merged = (*self.merged, name)

    @torch.no_grad()
    def merge_names(self, names: tuple[str, ...]) -> None:
        """Merges ``names`` in order (restoring a merged state :meth:`unmerge` undid)."""
        for name in names:
            if name not in self.merged:
                self.adapters[name].merge_into(self.base_layer)
                self.merged = (*self.merged, name)

    @torch.no_grad()
    def unmerge(self) -> None:
        for name in reversed(self.merged):
            self.adapters[name].unmerge_from(self.base_layer)
        self.merged = ()

    def extra_repr(self) -> str:
        return f"active={list(self.active)}, merged={list(self.merged)}"


# -- traversal --------------------------------------------------------------------------------------
_CONFIGS_ATTR = "_vlpeft_configs"


def adapter_configs(module: nn.Module) -> dict[str, MethodConfig]:
    """Name → config of every adapter added to ``module`` (empty when none)."""
    return module.__dict__.setdefault(_CONFIGS_ATTR, {})


def adapted_layers(module: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """(dotted name relative to ``module``, layer) for every injected layer."""
    for path, sub in module.named_modules():
        if isinstance(sub, AdaptedLayer):
            yield path, sub


def matches_targets(path: str, targets: list[str] | str) -> bool:
    """Whether the module path ``path`` is named by ``targets``: a list of exact names or dotted
    suffixes, or one regex string matched against the whole path."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def by_longest_prefix(path: str, values: dict[str, Any]) -> tuple[bool, Any]:
    """(found, value) of the key of ``values`` that is the longest module-path prefix of ``path``
    (``""`` prefixes every path; ``"a.b"`` prefixes ``a.b`` and ``a.b.c``, not ``a.bc``)."""
    keys = [k for k in values if k == "" or path == k or path.startswith(k + ".")]
    if not keys:
        return False, None
    return True, values[max(keys, key=len)]


def set_layer_context(module: nn.Module, attribute: str, value: Any) -> list[AdaptedLayer]:
    """Sets ``attribute`` of every adapted layer of ``module``: one value for all, or a dict of module
    paths relative to ``module`` → values (longest prefix wins; layers no key covers get None).
    Returns the layers it set."""
    values = value if isinstance(value, dict) else {"": value}
    layers = []
    for path, layer in adapted_layers(module):
        setattr(layer, attribute, by_longest_prefix(path, values)[1])
        layers.append(layer)
    return layers


@contextlib.contextmanager
def disable_adapters(module: nn.Module) -> Iterator[None]:
    """Inside the ``with`` block every adapted layer of ``module`` computes its base layer only
    (peft's ``disable_adapter()``); on exit, exceptions included, each layer is as before.

    Merged adapters are unmerged on entry (peft's disabled layer unmerges too) and merged again
    on exit, so the block sees the base weights W0 and the merged state is restored.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = vlpeft.add_adapter(net, vlpeft.LoRAConfig(targets=["0"], r=2))
        >>> with vlpeft.disable_adapters(net):
        ...     y = net(torch.randn(3, 4))  # the bare Linear's output
    """
    layers = [layer for _, layer in adapted_layers(module)]
    states = [(layer, layer.disabled, layer.merged) for layer in layers]
    try:
        for layer in layers:
            layer.unmerge()
            layer.disabled = True
        yield
    finally:
        for layer, disabled, merged in states:
            layer.disabled = disabled
            layer.merge_names(merged)


@contextlib.contextmanager
def gathered(params, modifier_rank: int | None = None):
    """Makes DeepSpeed ZeRO-3 partitioned parameters whole for the duration (a collective: every
    rank must enter); a no-op for ordinary tensors, so library code can use it unconditionally.

    ZeRO-3 leaves each rank an empty placeholder (``ds_id`` marks one): an SVD of it, or a saved
    copy, would silently be of nothing (peft #2892). Parameters already gathered are skipped, so
    code inside an outer ``gathered`` (entered by every rank) may run on one rank only.
    """
    partitioned = [
        p for p in params if hasattr(p, "ds_id") and getattr(p.ds_status, "name", "") != "AVAILABLE"
    ]
    if not partitioned:
        yield
        return
    import deepspeed  # heavy and optional: only a ZeRO-3 run reaches this line

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield
