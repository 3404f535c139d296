"""The adapter protocol shared by every PEFT method.

Every injected layer is an :class:`AdaptedLayer`: it keeps the original module as ``.base_layer``
(frozen) and holds one :class:`AdapterModule` per named adapter. Each method (one file in this
package) contributes a config dataclass, registered with :func:`register_method`, whose ``build``
makes the adapter module for one target layer.

An adapter module transforms the base layer's output: ``forward(base_layer, x, y) -> y'`` with ``x``
the base layer's input and ``y`` its output. A mergeable method also gives ``delta_weight`` (the
dense ΔW in the base weight's shape); a LoRA-reducible one gives ``lora_factors`` (A, B) with
ΔW = B·A, which is what the peft export writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

_METHODS: dict[str, type[MethodConfig]] = {}


def register_method(name: str) -> Callable[[type[MethodConfig]], type[MethodConfig]]:
    """Class decorator: registers a method config under ``name`` (refuses duplicates)."""

    def decorate(cls: type[MethodConfig]) -> type[MethodConfig]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__name__}")
        cls.method = name
        _METHODS[name] = cls
        return cls

    return decorate


def list_methods() -> list[str]:
    """Names of the registered PEFT methods."""
    return sorted(_METHODS)


def get_method(name: str) -> type[MethodConfig]:
    """The config class of a registered method; an unknown name lists the known ones."""
    if name not in _METHODS:
        raise KeyError(
            f"unknown method {name!r}{nearest_hint(name, _METHODS)}; known: {list_methods()}"
        )
    return _METHODS[name]


def nearest_hint(key: str, valid) -> str:
    """For error messages: ``(did you mean 'x'?)`` naming the closest of ``valid``, or ``""``."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclasses.dataclass
class MethodConfig:
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

    def __post_init__(self) -> None:
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

    # -- serialisation: JSON/YAML round trip, unknown keys are errors naming the nearest valid one
    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "adapter config") -> MethodConfig:
        """Builds the config of ``data["method"]`` (or of ``cls`` when called on a method class)."""
        data = dict(data)
        method = data.pop("method", None) or cls.method
        if not method:
            raise ValueError(f"{where}: missing key 'method' (one of {list_methods()})")
        config_cls = get_method(method)
        valid = {f.name for f in dataclasses.fields(config_cls)}
        for key in data:
            if key not in valid:
                raise ValueError(
                    f"{where}: unknown key {key!r} for method {method!r}{nearest_hint(key, valid)}; "
                    f"valid keys: {sorted(valid)}"
                )
        return config_cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


class AdapterModule(nn.Module):
    """One method's adapter on one layer. Subclasses set ``mergeable`` and implement ``forward``."""

    mergeable: ClassVar[bool] = False
    lora_reducible: ClassVar[bool] = False
    record: bool = False  # set by ReSoRA: keep (z, b) of the last forward

    def record_components(self, z: torch.Tensor, b: torch.Tensor) -> None:
        """Keeps the rank-1 components Δh_i = b_i z_i of this forward for ReSoRA (when recording).

        Args:
            z: (..., r) bottleneck activations.
            b: (d_out, r) up-projection columns, scale included.
        """
        if self.record:
            from .resora import _mask_for

            self.recorded = (z, b, _mask_for(z))

    def forward(self, base_layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def rank(self) -> int:
        raise NotImplementedError

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """Dense ΔW in the base weight's shape (mergeable methods only)."""
        raise TypeError(f"{type(self).__name__} is not mergeable: its update is not a weight delta")

    def lora_factors(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in peft's shapes with the scale folded in: ΔW = B·A (LoRA-reducible methods)."""
        raise TypeError(f"{type(self).__name__} cannot be written as a plain LoRA")


def _map_first(y: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Applies ``fn`` to a module output, or to the first element of a tuple output."""
    if isinstance(y, torch.Tensor):
        return fn(y)
    if isinstance(y, tuple) and y and isinstance(y[0], torch.Tensor):
        return (fn(y[0]), *y[1:])
    raise TypeError(f"cannot adapt a module output of type {type(y).__name__}")


class AdaptedLayer(nn.Module):
    """Wraps an original layer and applies the active named adapters to its output.

    Attributes:
        base_layer: the original module, frozen.
        adapters: ``nn.ModuleDict`` of adapter name → :class:`AdapterModule`.
        active: names applied in the forward, in order.
        merged: names whose ΔW is currently folded into ``base_layer``'s weight.
    """

    def __init__(self, base_layer: nn.Module, layer_name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.layer_name = layer_name
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()

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

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        y = self.base_layer(*args, **kwargs)
        pending = [n for n in self.active if n in self.adapters and n not in self.merged]
        if not pending:
            return y
        x = args[0] if args else next(iter(kwargs.values()))
        for name in pending:
            adapter = self.adapters[name]
            y = _map_first(y, lambda out, a=adapter: a(self.base_layer, x, out))
        return y

    @torch.no_grad()
    def merge(self) -> None:
        for name in self.active:
            if name in self.adapters and name not in self.merged:
                weight = self.base_layer.weight
                weight.add_(self.adapters[name].delta_weight(self.base_layer).to(weight.dtype))
                self.merged = (*self.merged, name)

    @torch.no_grad()
    def unmerge(self) -> None:
        for name in reversed(self.merged):
            weight = self.base_layer.weight
            weight.sub_(self.adapters[name].delta_weight(self.base_layer).to(weight.dtype))
        self.merged = ()

    def extra_repr(self) -> str:
        return f"active={list(self.active)}, merged={list(self.merged)}"


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
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield
