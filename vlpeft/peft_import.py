"""Importing peft LoRA (and DoRA) adapter directories into vlpeft layers.

:func:`load_peft_lora` reads what ``peft``'s ``save_pretrained`` writes — ``adapter_config.json`` and
``adapter_model.safetensors`` (a pickled ``adapter_model.bin`` is never loaded) — and adds it to a
module as a vlpeft adapter (:class:`~vlpeft.adapters.LoRAConfig`, or
:class:`~vlpeft.adapters.DoRAConfig` with ``use_dora``) that gives the outputs
``peft.PeftModel.from_pretrained`` gives.

peft's pattern keys (``target_modules`` when it is a string, ``rank_pattern``, ``alpha_pattern``,
``exclude_modules``, ``modules_to_save``) are matched as exact module names or dotted suffixes,
**never compiled as regexes** (a crafted pattern could hang the process); a key with regex syntax
that is not a plain dotted name is an error naming it. Everything peft would skip silently is an
error here: a pattern key that matches no module, a targeted module that gets no tensor (the
classic silent failure of a checkpoint written with another prefix), a tensor that belongs to no
targeted module, a ``lora_B`` of zeros.

:class:`LayerwiseConfig` (method ``layerwise``) is a method config with per-layer ranks and
alphas — what a peft ``rank_pattern``/``alpha_pattern`` gives, and what a merge at per-layer ranks
(:mod:`vlpeft.merge`) needs; it saves and reloads like every method.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .adapters import DoRAConfig, LoRAConfig
from .adapters.base import AdaptedLayer, AdapterModule, MethodConfig, register_method
from .checkpoint import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME
from .inject import add_adapter

__all__ = ["LayerwiseConfig", "load_peft_lora", "plain_name", "matches_name"]

_PLAIN = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")  # our pattern: never a file's


@register_method("layerwise")
@dataclasses.dataclass
class LayerwiseConfig(MethodConfig):
    """A rank-based method (``lora`` or ``dora``) with a rank and an alpha per layer.

    Args:
        base: the method's config as a dict (``{"method": "lora", "r": 8, "alpha": 8, ...}``):
            everything but the per-layer rank and alpha.
        ranks: exact layer name → rank (layers not named take ``base``'s r).
        alphas: exact layer name → alpha (layers not named take ``base``'s alpha).
        targets: the exact layer names (a list; matched as names or dotted suffixes).

    Example:
        >>> import torch, vlpeft
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> cfg = LayerwiseConfig(targets=["0", "1"], base={"method": "lora", "r": 2},
        ...                       ranks={"1": 1}, alphas={"1": 4.0})
        >>> _ = vlpeft.add_adapter(net, cfg)
        >>> net[1].adapters["default"].lora_A.shape, net[1].adapters["default"].scaling
        (torch.Size([1, 4]), 4.0)
    """

    base: dict[str, Any] = dataclasses.field(default_factory=dict)
    ranks: dict[str, int] = dataclasses.field(default_factory=dict)
    alphas: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.base, dict) or self.base.get("method") not in ("lora", "dora"):
            raise ValueError(
                "LayerwiseConfig.base must be a 'lora' or 'dora' config dict, got "
                f"{self.base.get('method') if isinstance(self.base, dict) else self.base!r}"
            )
        for key, value in self.ranks.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"LayerwiseConfig.ranks[{key!r}] must be an int >= 1, got {value!r}"
                )
        for key, value in self.alphas.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"LayerwiseConfig.alphas[{key!r}] must be a number, got {value!r}")
        base = dict(self.base)
        base.setdefault("targets", list(self.targets))
        self._inner = MethodConfig.from_dict(base, where="LayerwiseConfig.base")

    def layer_config(self, layer_name: str) -> MethodConfig:
        """The method config of one layer: the base with that layer's rank and alpha."""
        inner = self._inner
        r = self.ranks.get(layer_name, inner.r)
        alpha = float(self.alphas.get(layer_name, inner.alpha))
        return dataclasses.replace(inner, r=r, alpha=alpha)

    def build(self, base_layer: nn.Module, layer_name: str) -> AdapterModule:
        return self.layer_config(layer_name).build(base_layer, layer_name)


def plain_name(key: Any, where: str) -> str:
    """``key`` if it is a plain module name (``q_proj``, ``encoder.layers.0.fc1``); otherwise an
    error naming it: a pattern read from a file is never compiled."""
    if not isinstance(key, str) or not _PLAIN.fullmatch(key):
        raise ValueError(
            f"{where}: {key!r} is not a plain module name (letters, digits, '_', '-', dots); "
            "vlpeft never compiles a pattern read from a file — list the module names instead"
        )
    return key


def matches_name(path: str, key: str) -> bool:
    """Whether module ``path`` is named by ``key``: the same name or a dotted suffix of it."""
    return path == key or path.endswith("." + key)


# peft fields that change what a checkpoint means, with the value under which nothing changes
_NEUTRAL = {
    "bias": "none",
    "lora_bias": False,
    "layer_replication": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "use_bdlora": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "megatron_config": None,
}
# initialisations that change the base weight itself (the adapter needs that modified base)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no peft adapter config here")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        found = data.get("peft_type") if isinstance(data, dict) else type(data).__name__
        hint = " (a vlpeft checkpoint: use vlpeft.load_adapter)" if "vlpeft_format" in data else ""
        raise ValueError(
            f"{path}: expected a peft LoRA config (peft_type 'LORA'), got {found!r}{hint}"
        )
    for key, neutral in _NEUTRAL.items():
        value = data.get(key, neutral)
        if value != neutral and not (neutral is None and value in ([], {}, "")):
            raise ValueError(f"{path}: {key}={value!r} is not supported (expected {neutral!r})")
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"{path}: init_lora_weights={init!r} trains against a modified base weight; convert "
            "the adapter to a plain LoRA with peft first (path_initial_model_for_weight_conversion)"
        )
    for key in ("r", "lora_alpha"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"{path}: {key} must be a positive number, got {value!r}")
    return data


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickled = directory / "adapter_model.bin"
        why = (
            f" ({pickled.name} is a pickle, which vlpeft never loads: re-save it with "
            "safe_serialization=True)"
            if pickled.is_file()
            else ""
        )
        raise FileNotFoundError(f"{path}: adapter weights missing{why}")
    return load_file(str(path))


def _keys(data: dict, field: str, path: Path) -> list[str]:
    """The names of a pattern field (a string is one name; a list many), each a plain name."""
    value = data.get(field)
    if value is None:
        return []
    if value == "all-linear":
        raise ValueError(
            f"{path}: {field} 'all-linear' (peft's every-linear-layer shorthand) is not supported: "
            "name the modules"
        )
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | dict):
        raise ValueError(f"{path}: {field} must be a string or a list, got {value!r}")
    return [plain_name(k, f"{path}: {field}") for k in items]


def _modules(backbone: nn.Module) -> dict[str, nn.Module]:
    """Path → module of ``backbone``; an adapted layer counts under its own path as its base
    layer (a checkpoint names the original layers), its insides not."""
    found: dict[str, nn.Module] = {}
    skip: list[str] = []
    for path, sub in backbone.named_modules():
        if not path or any(path.startswith(s) for s in skip):
            continue
        if isinstance(sub, AdaptedLayer):
            skip.append(path + ".")
            sub = sub.base_layer
        found[path] = sub
    return found


def _first_match(path: str, keys: list[str]) -> str | None:
    """peft's rule for rank/alpha patterns: the first key (in the file's order) that names it."""
    return next((k for k in keys if matches_name(path, k)), None)


def load_peft_lora(
    module: nn.Module,
    directory: str | os.PathLike,
    name: str = "default",
    prefix: str | None = None,
) -> nn.Module:
    """Adds the peft LoRA (or DoRA) adapter at ``directory`` to ``module`` as adapter ``name``.

    Per-layer ranks and alphas (``rank_pattern``/``alpha_pattern``), ``use_rslora`` (scale
    α/√r), ``use_dora``, ``lora_dropout`` and ``modules_to_save`` (their tensors are copied into
    the module and declared trainable by the new adapter, as vlpeft's own trainable extras) are
    honoured; ``fan_in_fan_out`` follows the layer type, as peft corrects it. A layer of its own
    rank or alpha makes the adapter a :class:`LayerwiseConfig`; otherwise it is a plain
    ``LoRAConfig``/``DoRAConfig`` whose targets are the exact layer names. Nothing is changed
    before every check has passed.

    Args:
        module: the model (a VL model or a bare backbone).
        directory: a directory written by peft's ``save_pretrained`` (or
            :func:`vlpeft.export_peft_lora`).
        name: the new adapter's name (an existing name is an error).
        prefix: dotted path inside ``module`` of the backbone the adapter was trained on (e.g.
            ``"bart"`` for CLIP-BART's text model); None: ``module`` itself.

    Returns:
        ``module``, with the adapter added (made active only if no adapter was).

    Example:
        >>> vlpeft.load_peft_lora(model, "peft_dir", name="vqa", prefix="bart")  # doctest: +SKIP
    """
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    data = _read_config(directory)
    tensors = _read_tensors(directory)
    backbone = module.get_submodule(prefix) if prefix else module
    lead = prefix + "." if prefix else ""
    where = f"{type(backbone).__name__}" + (f" (prefix {prefix!r})" if prefix else "")
    modules = _modules(backbone)

    saved = _keys(data, "modules_to_save", cfg_path)
    layers = _targeted(data, modules, saved, cfg_path, where)
    ranks, alphas = _layer_ranks(data, layers, cfg_path)
    state, extra_tensors = _split_tensors(tensors, layers, bool(data.get("use_dora")), directory)
    _check_layer_tensors(state, layers, ranks, bool(data.get("use_dora")), directory)
    extras = _modules_to_save(saved, modules, extra_tensors, lead, directory, where)

    params = {n for n, _ in module.named_parameters()}  # buffers are copied, not trained
    trained = [n for n in extras if n in params]
    config = _vlpeft_config(data, layers, ranks, alphas, lead, trained)
    add_adapter(module, config, name)
    with torch.no_grad():
        for rel in layers:
            adapter = module.get_submodule(lead + rel).adapters[name]
            adapter.lora_A.copy_(state[rel]["lora_A"])
            adapter.lora_B.copy_(state[rel]["lora_B"])
            if "magnitude" in state[rel]:
                adapter.magnitude.copy_(state[rel]["magnitude"].reshape(adapter.magnitude.shape))
        for full, tensor in extras.items():
            _tensor_of(module, full).copy_(tensor)
    return module


def _targeted(
    data: dict, modules: dict[str, nn.Module], saved: list[str], path: Path, where: str
) -> dict[str, nn.Module]:
    """Relative path → base layer of every module ``target_modules`` names (after
    ``exclude_modules`` and the modules kept whole by ``modules_to_save``)."""
    targets = _keys(data, "target_modules", path)
    if not targets:
        raise ValueError(f"{path}: target_modules is empty")
    excluded = _keys(data, "exclude_modules", path)
    for key in targets:
        if not any(matches_name(p, key) for p in modules):
            raise ValueError(
                f"{path}: target_modules key {key!r} matches no module of {where} "
                "(trained on another backbone, or a wrong prefix?)"
            )

    def inside_saved(p: str) -> bool:
        parts = p.split(".")
        return any(
            matches_name(".".join(parts[:i]), key)
            for key in saved
            for i in range(1, len(parts) + 1)
        )

    layers = {
        p: sub
        for p, sub in modules.items()
        if any(matches_name(p, k) for k in targets)
        and not any(matches_name(p, k) for k in excluded)
        and not inside_saved(p)
    }
    if not layers:
        raise ValueError(f"{path}: target_modules {targets} leave no module of {where} to adapt")
    return layers


def _layer_ranks(data: dict, layers: dict, path: Path) -> tuple[dict[str, int], dict[str, float]]:
    """Per layer: rank and the alpha that gives peft's scale with vlpeft's alpha / r."""
    ranks, alphas = {}, {}
    patterns = {}
    for field in ("rank_pattern", "alpha_pattern"):
        value = data.get(field) or {}
        if not isinstance(value, dict):
            raise ValueError(f"{path}: {field} must be a mapping, got {value!r}")
        keys = [plain_name(k, f"{path}: {field}") for k in value]
        for key in keys:
            if not any(matches_name(p, key) for p in layers):
                raise ValueError(f"{path}: {field} key {key!r} matches no targeted module")
        patterns[field] = (keys, value)
    for rel in layers:
        keys, value = patterns["rank_pattern"]
        key = _first_match(rel, keys)
        r = value[key] if key is not None else data["r"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{path}: the rank of {rel} must be an int >= 1, got {r!r}")
        keys, value = patterns["alpha_pattern"]
        key = _first_match(rel, keys)
        alpha = float(value[key] if key is not None else data["lora_alpha"])
        # vlpeft's scale is alpha / r; peft's rsLoRA scale is alpha / √r
        ranks[rel], alphas[rel] = r, alpha * math.sqrt(r) if data.get("use_rslora") else alpha
    return ranks, alphas


_LAYER_SUFFIXES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_magnitude_vector": "magnitude",
}


def _split_tensors(
    tensors: dict[str, torch.Tensor], layers: dict, dora: bool, directory: Path
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(layer → its lora tensors, relative name → every other tensor)."""
    where = directory / WEIGHTS_NAME
    state: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{where}: tensor {key!r} does not start with {PEFT_PREFIX!r}")
        rel = key[len(PEFT_PREFIX) :]
        kind = next((k for s, k in _LAYER_SUFFIXES.items() if rel.endswith(s)), None)
        if kind is None:
            if ".lora_" in rel:
                raise ValueError(f"{where}: tensor {key!r} is of a LoRA kind vlpeft does not load")
            others[rel] = tensor
            continue
        layer = rel[: -len(next(s for s, k in _LAYER_SUFFIXES.items() if k == kind))]
        if layer not in layers:
            raise ValueError(
                f"{where}: tensor {key!r} is for module {layer!r}, which target_modules does not "
                "name in this model"
            )
        if kind == "magnitude" and not dora:
            raise ValueError(f"{where}: tensor {key!r} is DoRA's but the config has no use_dora")
        state.setdefault(layer, {})[kind] = tensor
    return state, others


def _check_layer_tensors(
    state: dict, layers: dict, ranks: dict, dora: bool, directory: Path
) -> None:
    where = directory / WEIGHTS_NAME
    for rel, base in layers.items():
        got = state.get(rel, {})
        needed = ["lora_A", "lora_B"] + (["magnitude"] if dora else [])
        missing = [k for k in needed if k not in got]
        if missing:
            raise ValueError(
                f"{where}: module {rel!r} gets no {missing[0]} tensor (expected key "
                f"{PEFT_PREFIX}{rel}{next(s for s, k in _LAYER_SUFFIXES.items() if k == missing[0])}"
                "; a checkpoint written with another prefix?)"
            )
        a, b, r = got["lora_A"], got["lora_B"], ranks[rel]
        a_shape, b_shape, out = _expected_shapes(base, r, rel)
        for key, tensor, shape in (("lora_A", a, a_shape), ("lora_B", b, b_shape)):
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{where}: {PEFT_PREFIX}{rel}.{key}.weight has shape {tuple(tensor.shape)}, "
                    f"expected {shape} (rank {r} from the config, the layer's sizes)"
                )
        if dora and got["magnitude"].numel() != out:
            raise ValueError(
                f"{where}: {rel}.lora_magnitude_vector has {got['magnitude'].numel()} values, "
                f"expected {out} (one per output)"
            )
        if not torch.any(b):
            raise ValueError(
                f"{where}: {PEFT_PREFIX}{rel}.lora_B.weight is all zeros: the adapter would load as "
                "no change (an untrained adapter, or weights saved from the wrong place)"
            )


def _expected_shapes(base: nn.Module, r: int, rel: str) -> tuple[tuple, tuple, int]:
    if isinstance(base, nn.Conv2d):
        return (
            (r, base.in_channels, *base.kernel_size),
            (base.out_channels, r, 1, 1),
            base.out_channels,
        )
    if isinstance(base, nn.Linear):
        return (r, base.in_features), (base.out_features, r), base.out_features
    if type(base).__name__ == "Conv1D" and base.weight.dim() == 2:
        d_in, d_out = base.weight.shape
        return (r, d_in), (d_out, r), d_out
    raise TypeError(
        f"{rel} is a {type(base).__name__}: vlpeft loads peft LoRA on Linear, Conv1D and Conv2d"
    )


def _modules_to_save(
    saved: list[str],
    modules: dict[str, nn.Module],
    others: dict[str, torch.Tensor],
    lead: str,
    directory: Path,
    where: str,
) -> dict[str, torch.Tensor]:
    """Full name in ``module`` → tensor for every tensor of the ``modules_to_save`` modules."""
    owners = []
    for key in saved:
        hits = [p for p in modules if matches_name(p, key)]
        if not hits:
            raise ValueError(
                f"{directory / CONFIG_NAME}: modules_to_save key {key!r} matches no module of {where}"
            )
        owners.extend(h for h in hits if h not in owners)
    out: dict[str, torch.Tensor] = {}
    for owner in owners:
        for key, tensor in modules[owner].state_dict().items():
            rel = f"{owner}.{key}"
            if rel not in others:
                raise ValueError(
                    f"{directory / WEIGHTS_NAME}: modules_to_save module {owner!r} gets no tensor "
                    f"{PEFT_PREFIX}{rel}"
                )
            if others[rel].shape != tensor.shape:
                raise ValueError(
                    f"{directory / WEIGHTS_NAME}: {PEFT_PREFIX}{rel} has shape "
                    f"{tuple(others[rel].shape)}, the model's is {tuple(tensor.shape)}"
                )
            out[lead + rel] = others.pop(rel)
    if others:
        first = sorted(others)[0]
        raise ValueError(
            f"{directory / WEIGHTS_NAME}: tensor {PEFT_PREFIX}{first} belongs to no targeted module "
            f"and no modules_to_save module ({len(others)} such)"
        )
    return out


def _vlpeft_config(
    data: dict, layers: dict, ranks: dict, alphas: dict, lead: str, trained: list[str]
) -> MethodConfig:
    """The adapter's config: targets the exact layer names, ``trained`` (parameters of the
    modules_to_save modules) declared trainable by exact name."""
    targets = [lead + rel for rel in layers]
    trainable = [f"^{re.escape(n)}$" for n in trained]
    cls = DoRAConfig if data.get("use_dora") else LoRAConfig
    dropout = float(data.get("lora_dropout") or 0.0)
    pairs = {(ranks[rel], alphas[rel]) for rel in layers}
    if len(pairs) == 1:
        r, alpha = pairs.pop()
        return cls(targets=targets, trainable=trainable, r=r, alpha=alpha, dropout=dropout)
    r = max(ranks.values())
    base = cls(targets=targets, r=r, dropout=dropout).to_dict()
    return LayerwiseConfig(
        targets=targets,
        trainable=trainable,
        base=base,
        ranks={lead + rel: v for rel, v in ranks.items()},
        alphas={lead + rel: v for rel, v in alphas.items()},
    )


def _tensor_of(module: nn.Module, full: str) -> torch.Tensor:
    owner, _, attr = full.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    return getattr(sub, attr)
