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
targeted module, a NaN or inf in a rank, an alpha or a tensor. A malformed
``adapter_config.json`` (not JSON, not an object, a value of the wrong type) is a one-line
``ValueError`` naming the file and the key. A wrong ``prefix`` is caught by what it is: keys that
name modules the model does not have. An all-zero ``lora_B`` (peft's ``init_lora_weights=True``,
untrained) loads, with a warning: it is a valid adapter that changes nothing yet.

Which vlpeft method a checkpoint becomes is the methods' answer, not a name here: each method
config that loads peft checkpoints says which ``LoraConfig`` flags select it (``peft_flags``:
LoRA ``use_dora`` false, DoRA true) and which tensors each layer has in the file
(``peft_layer_tensors``). A layer of its own rank or alpha makes the adapter a
:class:`~vlpeft.adapters.LayerwiseConfig` (method ``layerwise``, in ``vlpeft/adapters/layerwise.py``;
importable from here as before).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .adapters import LayerwiseConfig
from .adapters.base import METHODS, AdaptedLayer, MethodConfig
from .checkpoint import CONFIG_NAME, EXTRA_CONFIG, PEFT_PREFIX, WEIGHTS_NAME
from .inject import add_adapter

log = logging.getLogger(__name__)

__all__ = ["LayerwiseConfig", "load_peft_lora", "matches_name", "peft_method", "plain_name"]

_PLAIN = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")  # our pattern: never a file's


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
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a JSON object (a peft LoRA config), got {type(data).__name__}"
        )
    found = data.get("peft_type")
    if found != "LORA":
        hint = " (a vlpeft checkpoint: use vlpeft.load_adapter)" if "vlpeft_format" in data else ""
        raise ValueError(
            f"{path}: expected a peft LoRA config (peft_type 'LORA'), got {found!r}{hint}"
        )
    for key, neutral in _NEUTRAL.items():
        value = data.get(key, neutral)
        if value != neutral and not (neutral is None and value in ([], {}, "")):
            raise ValueError(f"{path}: {key}={value!r} is not supported (expected {neutral!r})")
    init = data.get("init_lora_weights", True)
    if not isinstance(init, bool | str):
        raise ValueError(f"{path}: init_lora_weights must be true, false or a name, got {init!r}")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"{path}: init_lora_weights={init!r} trains against a modified base weight; convert "
            "the adapter to a plain LoRA with peft first (path_initial_model_for_weight_conversion)"
        )
    _check_numbers(data, path)
    return data


def _check_numbers(data: dict[str, Any], path: Path) -> None:
    """The scalar fields vlpeft reads, by type and range, each error naming the key (a NaN or inf
    — which Python's json reads from ``NaN``/``Infinity`` — is no rank, alpha or probability)."""
    _rank(data.get("r"), f"{path}: r")
    _alpha(data.get("lora_alpha"), f"{path}: lora_alpha")
    for field, check in (("rank_pattern", _rank), ("alpha_pattern", _alpha)):
        value = data.get(field) or {}
        if not isinstance(value, dict):
            raise ValueError(f"{path}: {field} must be a mapping, got {value!r}")
        for key, item in value.items():
            check(item, f"{path}: {field}[{key!r}]")
    dropout = data.get("lora_dropout") or 0.0
    if not _real(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"{path}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    flags = {k for _, c in METHODS.items() for k in (c.peft_flags or {})} | {"use_rslora"}
    for key in sorted(flags):
        if data.get(key) is not None and not isinstance(data[key], bool):
            raise ValueError(f"{path}: {key} must be true or false, got {data[key]!r}")


def _real(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (a bool is neither)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _rank(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be an int >= 1, got {value!r}")


def _alpha(value: Any, where: str) -> None:
    if not _real(value) or value <= 0:
        raise ValueError(f"{where} must be a positive finite number, got {value!r}")


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
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors' own error type is not a ValueError
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {key!r} has NaN or inf values")
    return tensors


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


def peft_method(data: dict[str, Any], where: str = "peft config") -> type[MethodConfig]:
    """The registered method a peft LoRA config's flags select: the one whose ``peft_flags`` all
    equal the file's (``use_dora`` false: LoRA, true: DoRA); an absent flag reads as false."""
    found = [
        cls
        for _, cls in METHODS.items()
        if cls.peft_flags is not None
        and all(bool(data.get(key)) == bool(value) for key, value in cls.peft_flags.items())
    ]
    if len(found) != 1:
        flags = {k: data.get(k) for _, c in METHODS.items() for k in (c.peft_flags or {})}
        raise ValueError(
            f"{where}: peft flags {flags} select {[c.method for c in found] or 'no'} vlpeft method "
            "(exactly one must load the checkpoint)"
        )
    return found[0]


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
    rank or alpha makes the adapter a :class:`~vlpeft.adapters.LayerwiseConfig`; otherwise it is a plain
    ``LoRAConfig``/``DoRAConfig`` whose targets are the exact layer names. Nothing is changed
    before every check has passed.

    Args:
        module: the model (a VL model or a bare backbone).
        directory: a directory written by peft's ``save_pretrained`` (or
            :func:`vlpeft.export_peft_lora`).
        name: the new adapter's name (an existing name is an error).
        prefix: dotted path inside ``module`` of the backbone the adapter was trained on (e.g.
            ``"bart"`` for CLIP-BART's text model); None: the ``backbone`` recorded in the
            directory's ``vlpeft_extra.json`` (written by :func:`vlpeft.export_peft_lora`) when
            ``module`` has it — then the wrapper's tensors of ``vlpeft_extra.safetensors`` are
            loaded (and declared trainable) too — else ``module`` itself.

    Returns:
        ``module``, with the adapter added (made active only if no adapter was).

    Example:
        >>> vlpeft.load_peft_lora(model, "peft_dir", name="vqa", prefix="bart")  # doctest: +SKIP
    """
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    data = _read_config(directory)
    tensors = _read_tensors(directory)
    wrapper = _read_extra(directory, module, prefix)
    prefix = wrapper.get("backbone", prefix)
    backbone = module.get_submodule(prefix) if prefix else module
    lead = prefix + "." if prefix else ""
    where = f"{type(backbone).__name__}" + (f" (prefix {prefix!r})" if prefix else "")
    modules = _modules(backbone)

    method = peft_method(data, str(cfg_path))
    saved = _keys(data, "modules_to_save", cfg_path)
    layers = _targeted(data, modules, saved, cfg_path, where)
    ranks, alphas = _layer_ranks(data, layers, cfg_path)
    state, extra_tensors = _split_tensors(tensors, layers, method, directory)
    _check_layer_tensors(state, layers, ranks, method, directory)
    extras = _modules_to_save(saved, modules, extra_tensors, lead, directory, where)

    extras.update(wrapper.get("tensors", {}))
    params = {n for n, _ in module.named_parameters()}  # buffers are copied, not trained
    trained = [n for n in extras if n in params]
    config = _vlpeft_config(data, method, layers, ranks, alphas, lead, trained)
    add_adapter(module, config, name)
    with torch.no_grad():
        for rel in layers:
            adapter = module.get_submodule(lead + rel).adapters[name]
            for suffix, attr in method.peft_layer_tensors.items():
                target = getattr(adapter, attr)  # a DoRA conv's magnitude: (1, out, 1, 1) in peft
                target.copy_(state[rel][suffix].reshape(target.shape))
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
    for field in ("rank_pattern", "alpha_pattern"):  # types and values: _check_numbers
        value = data.get(field) or {}
        keys = [plain_name(k, f"{path}: {field}") for k in value]
        for key in keys:
            if not any(matches_name(p, key) for p in layers):
                raise ValueError(f"{path}: {field} key {key!r} matches no targeted module")
        patterns[field] = (keys, value)
    for rel in layers:
        keys, value = patterns["rank_pattern"]
        key = _first_match(rel, keys)
        r = value[key] if key is not None else data["r"]
        keys, value = patterns["alpha_pattern"]
        key = _first_match(rel, keys)
        alpha = float(value[key] if key is not None else data["lora_alpha"])
        # vlpeft's scale is alpha / r; peft's rsLoRA scale is alpha / √r
        ranks[rel], alphas[rel] = r, alpha * math.sqrt(r) if data.get("use_rslora") else alpha
    return ranks, alphas


def _split_tensors(
    tensors: dict[str, torch.Tensor], layers: dict, method: type[MethodConfig], directory: Path
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(layer → its tensors by suffix, relative name → every other tensor). A layer tensor of
    another method (DoRA's magnitude in a plain LoRA) is an error naming that method."""
    where = directory / WEIGHTS_NAME
    owner = {s: name for name, c in METHODS.items() for s in c.peft_layer_tensors}
    owner.update(dict.fromkeys(method.peft_layer_tensors, method.method))
    state: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{where}: tensor {key!r} does not start with {PEFT_PREFIX!r}")
        rel = key[len(PEFT_PREFIX) :]
        suffix = next((s for s in owner if rel.endswith("." + s)), None)
        if suffix is None:
            if ".lora_" in rel:
                raise ValueError(f"{where}: tensor {key!r} is of a LoRA kind vlpeft does not load")
            others[rel] = tensor
            continue
        layer = rel[: -len(suffix) - 1]
        if layer not in layers:
            raise ValueError(
                f"{where}: tensor {key!r} is for module {layer!r}, which target_modules does not "
                "name in this model"
            )
        if suffix not in method.peft_layer_tensors:
            flags = METHODS.get(owner[suffix]).peft_flags
            raise ValueError(
                f"{where}: tensor {key!r} is {owner[suffix]!r}'s but the config has no {flags} "
                f"(it loads as {method.method!r})"
            )
        state.setdefault(layer, {})[suffix] = tensor
    return state, others


def _check_layer_tensors(
    state: dict, layers: dict, ranks: dict, method: type[MethodConfig], directory: Path
) -> None:
    where = directory / WEIGHTS_NAME
    zeros: list[str] = []
    for rel, base in layers.items():
        got = state.get(rel, {})
        missing = [s for s in method.peft_layer_tensors if s not in got]
        if missing:
            raise ValueError(
                f"{where}: module {rel!r} gets no {method.peft_layer_tensors[missing[0]]} tensor "
                f"(expected key {PEFT_PREFIX}{rel}.{missing[0]}; a checkpoint written with "
                "another prefix?)"
            )
        a, b, r = got["lora_A.weight"], got["lora_B.weight"], ranks[rel]
        a_shape, b_shape, out = _expected_shapes(base, r, rel)
        for key, tensor, shape in (("lora_A", a, a_shape), ("lora_B", b, b_shape)):
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{where}: {PEFT_PREFIX}{rel}.{key}.weight has shape {tuple(tensor.shape)}, "
                    f"expected {shape} (rank {r} from the config, the layer's sizes)"
                )
        magnitude = got.get("lora_magnitude_vector")  # peft's DoRA: one value per output
        if magnitude is not None and magnitude.numel() != out:
            raise ValueError(
                f"{where}: {rel}.lora_magnitude_vector has {magnitude.numel()} values, "
                f"expected {out} (one per output)"
            )
        if not torch.any(b):
            zeros.append(rel)
    if zeros:  # a wrong prefix is caught by names (tensors for modules the model lacks), not here
        log.warning(
            "%s: lora_B is all zeros in %d of %d layers (e.g. %s): an initialised, untrained "
            "adapter — it changes no output until trained",
            where,
            len(zeros),
            len(layers),
            zeros[0],
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
    data: dict,
    cls: type[MethodConfig],
    layers: dict,
    ranks: dict,
    alphas: dict,
    lead: str,
    trained: list[str],
) -> MethodConfig:
    """The adapter's config of method ``cls``: targets the exact layer names, ``trained``
    (parameters of the modules_to_save modules) declared trainable by exact name."""
    targets = [lead + rel for rel in layers]
    trainable = [f"^{re.escape(n)}$" for n in trained]
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


def _read_extra(directory: Path, module: nn.Module, prefix: str | None) -> dict[str, Any]:
    """What :func:`vlpeft.export_peft_lora` wrote beside a peft checkpoint for the VL wrapper:
    ``{"backbone": prefix, "tensors": {full name: tensor}}`` when ``module`` has that backbone
    (and ``prefix`` is None or names it); ``{}`` without the side file, or when the adapter goes
    elsewhere (``module`` the bare backbone itself, another ``prefix``: the wrapper's tensors are
    then not loaded, a warning says so)."""
    path = directory / EXTRA_CONFIG
    if not path.is_file():
        return {}
    data = _read_json_object(path)
    backbone = data.get("backbone")
    names = data.get("names") or []
    if not isinstance(backbone, str) or not isinstance(names, list):
        raise ValueError(f"{path}: 'backbone' must be a string and 'names' a list")
    backbone = plain_name(backbone, f"{path}: backbone")
    names = [plain_name(n, f"{path}: names") for n in names]
    try:
        module.get_submodule(backbone)
        elsewhere = prefix is not None and prefix != backbone
    except AttributeError:
        elsewhere = True
    if elsewhere:
        if names:
            log.warning(
                "%s: the export's backbone is %r, the adapter goes to %r of %s: the wrapper's "
                "tensors %s are not loaded",
                path,
                backbone,
                prefix or "",
                type(module).__name__,
                names,
            )
        return {}
    return {"backbone": backbone, "tensors": _extra_tensors(directory, data, names, module)}


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _extra_tensors(
    directory: Path, data: dict, names: list[str], module: nn.Module
) -> dict[str, torch.Tensor]:
    """Full name → tensor of the wrapper's tensors, each checked against ``module``."""
    if not names:
        return {}
    path = directory / str(data.get("tensors"))
    if data.get("tensors") is None or not path.is_file() or path.parent != directory:
        raise FileNotFoundError(f"{directory / EXTRA_CONFIG}: its tensors file is missing")
    try:
        stored = load_file(str(path))
    except Exception as e:  # safetensors' own error type is not a ValueError
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    own = dict(module.state_dict(keep_vars=True))
    for n in names:
        if n not in stored or n not in own:
            where = "the file" if n not in stored else type(module).__name__
            raise ValueError(f"{path}: tensor {n!r} is not in {where}")
        if stored[n].shape != own[n].shape:
            raise ValueError(
                f"{path}: {n} has shape {tuple(stored[n].shape)}, the model's is "
                f"{tuple(own[n].shape)}"
            )
        if stored[n].is_floating_point() and not torch.isfinite(stored[n]).all():
            raise ValueError(f"{path}: tensor {n!r} has NaN or inf values")
    return {n: stored[n] for n in names}
