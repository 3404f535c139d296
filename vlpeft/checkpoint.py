"""Adapter checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors`` (never pickle).

Layout (as peft's): the adapter named ``default`` at the top of the directory, every other named
adapter in ``<directory>/<name>/``; ``save_adapter(m, d, name="vqa")`` writes that one adapter alone
at the top of ``d`` (a self-contained per-task checkpoint). Only adapter tensors (parameters and
frozen buffers such as Null-LoRA bases) and the config's declared-trainable parameters are written.
Every file is written to a temporary name and renamed, so a killed process never leaves half a file.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters.base import MethodConfig, gathered, is_conv1d
from .inject import adapted_layers, adapter_configs, add_adapter, trainable_extra_names

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 2  # 2: the resolved layer names (loading never compiles a pattern from a file)
PEFT_PREFIX = "base_model.model."  # PeftModel → LoraModel → the wrapped backbone


def atomic_write(path: str | os.PathLike, write) -> None:
    """Calls ``write(tmp_path)`` then renames ``tmp_path`` onto ``path`` (same directory, atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the mode a plain write gives
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata=None
) -> None:
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def adapter_state_dict(module: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Tensors of adapter ``name``: ``<layer>.<tensor>`` for each adapted layer, plus the full names
    of the parameters its config declares trainable."""
    state: dict[str, torch.Tensor] = {}
    for path, layer in adapted_layers(module):
        if name in layer.adapters:
            for key, tensor in layer.adapters[name].state_dict().items():
                state[f"{path}.{key}"] = tensor
    params = dict(module.named_parameters())
    for extra in trainable_extra_names(module, adapter_configs(module)[name]):
        state[extra] = params[extra]
    return state


def save_adapter(module: nn.Module, directory: str | os.PathLike, name: str | None = None) -> None:
    """Writes adapter ``name`` at the top of ``directory``, or every adapter (default at the top,
    the others in sub-directories) when ``name`` is None."""
    configs = adapter_configs(module)
    if not configs:
        raise ValueError("this module has no adapters to save; add_adapter first")
    if name is not None:
        _save_one(module, Path(directory), name)
        return
    for n in configs:
        _save_one(module, Path(directory) if n == "default" else Path(directory) / n, n)


def _save_one(module: nn.Module, directory: Path, name: str) -> None:
    configs = adapter_configs(module)
    if name not in configs:
        raise KeyError(f"no adapter named {name!r}; this module has {sorted(configs)}")
    with gathered(module.parameters()):  # ZeRO-3: save whole tensors, not placeholders
        state = adapter_state_dict(module, name)
        write_safetensors(
            directory / WEIGHTS_NAME, state, metadata={"format": "pt", "adapter_name": name}
        )
    extras = trainable_extra_names(module, configs[name])
    write_json(
        directory / CONFIG_NAME,
        {
            "vlpeft_format": FORMAT_VERSION,
            "adapter_name": name,
            "config": configs[name].to_dict(),
            "base_model_class": type(module).__name__,
            "extra_trainable": extras,
            "resolved": resolved_placement(module, name),
        },
    )


def resolved_placement(module: nn.Module, name: str) -> dict[str, Any]:
    """Where adapter ``name`` sits, by exact layer name: its layers, the routed ones and the LoRA
    slices of each — what loading uses instead of the config's patterns."""
    layers, routed, slices = [], [], {}
    for path, layer in adapted_layers(module):
        if name in layer.adapters:
            adapter = layer.adapters[name]
            layers.append(path)
            if adapter.routing is not None:
                routed.append(path)
            if adapter.slice_spec is not None:
                slices[path] = adapter.slice_spec
    return {"layers": layers, "routed": routed, "slices": slices}


def _from_resolved(config: MethodConfig, data: dict, path: Path) -> MethodConfig:
    """``config`` placed by the exact names the checkpoint recorded. A pattern read from a file is
    never compiled as a regex (a crafted one could hang the process); a checkpoint of format 1
    with a regex ``targets`` is refused."""
    exact = [f"^{re.escape(n)}$" for n in data.get("extra_trainable", [])]
    resolved = data.get("resolved")
    if resolved is None:
        regex = [
            k for k in ("targets", "route_targets") if isinstance(getattr(config, k, None), str)
        ]
        if regex:
            raise ValueError(
                f"{path}: written by an older vlpeft with a regex {regex[0]!r} "
                f"({getattr(config, regex[0])!r}); patterns from a file are not compiled: "
                "re-save the adapter with this version"
            )
        placed = dataclasses.replace(config, trainable=exact)
    else:
        layers = [str(n) for n in resolved["layers"]]
        changes: dict[str, Any] = {"targets": layers, "trainable": exact}
        if getattr(config, "routing", None):
            routed = [str(n) for n in resolved.get("routed", [])]
            changes["route_targets"] = None if routed == layers else routed
        if config.supports_slices:
            changes["slices"] = {str(k): v for k, v in resolved.get("slices", {}).items()}
        placed = dataclasses.replace(config, **changes)
    placed.exact_names = True  # slices are looked up by exact name only (LoRAConfig.slice_spec)
    return placed


def read_adapter_config(directory: str | os.PathLike) -> tuple[str, MethodConfig]:
    """(stored adapter name, config) of a vlpeft checkpoint directory, with clear errors."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no adapter config here (expected {CONFIG_NAME} + {WEIGHTS_NAME})"
        )
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a JSON object (a vlpeft adapter config), got {type(data).__name__}"
        )
    for key in ("adapter_name", "config"):
        if key not in data:
            hint = (
                " (this looks like a peft checkpoint: load it with vlpeft.load_peft_lora)"
                if "peft_type" in data
                else ""
            )
            raise ValueError(f"{path}: missing key {key!r}{hint}")
    _check_layout(data, path)
    try:
        config = MethodConfig.from_dict(data["config"], where=str(path))
    except RecursionError:  # parsed, but too deep for the checks that walk it
        raise ValueError(f"{path}: config nested too deeply to read") from None
    return data["adapter_name"], _from_resolved(config, data, path)


def read_json_file(path: str | Path, error: type[Exception] = ValueError) -> Any:
    """The JSON in ``path``, or a one-line ``error`` naming it: missing or not a regular file (a
    FIFO would block), not UTF-8, malformed, or nested too deeply to parse (Python's parser
    recurses). The launcher reads its own files through it too, with its error type."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: not found (or not a regular file)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to read") from None


def _check_layout(data: dict, path: Path) -> None:
    """The keys loading reads besides ``config``, by type, each error naming the key: a damaged
    or crafted file gives a message, not a TypeError from inside ``_from_resolved``."""
    name = data["adapter_name"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path}: adapter_name must be a non-empty string, got {name!r:.80}")
    _names(data.get("extra_trainable", []), f"{path}: extra_trainable")
    resolved = data.get("resolved")
    if resolved is None:
        return
    if not isinstance(resolved, dict) or "layers" not in resolved:
        raise ValueError(f"{path}: resolved must be an object with 'layers', got {resolved!r:.80}")
    _names(resolved["layers"], f"{path}: resolved.layers")
    _names(resolved.get("routed", []), f"{path}: resolved.routed")
    slices = resolved.get("slices", {})
    if not isinstance(slices, dict):
        raise ValueError(f"{path}: resolved.slices must be an object, got {slices!r:.80}")


def _names(value: Any, where: str) -> None:
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise ValueError(f"{where} must be a list of names, got {value!r:.80}")


def load_adapter(
    module: nn.Module, directory: str | os.PathLike, name: str | None = None
) -> nn.Module:
    """Loads the checkpoint at ``directory`` as adapter ``name`` (default: the name it was saved
    under), injecting it first if the module does not have it; with ``name`` None, adapters in
    sub-directories are loaded too. Shapes and layer names must match exactly.
    """
    directory = Path(directory)
    subdirs = (
        sorted(p for p in directory.iterdir() if (p / CONFIG_NAME).is_file())
        if directory.is_dir()
        else []
    )
    if name is not None or (directory / CONFIG_NAME).is_file() or not subdirs:
        stored, config = read_adapter_config(directory)
        target = name or stored
        if target not in adapter_configs(module):
            add_adapter(module, config, target)
        _load_tensors(module, directory / WEIGHTS_NAME, target)
    if name is None:
        for sub in subdirs:
            load_adapter(module, sub, None)
    return module


@torch.no_grad()
def _load_tensors(module: nn.Module, path: Path, name: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: adapter weights missing")
    try:
        stored = load_file(str(path))
    except Exception as e:  # safetensors' own error type is not a ValueError
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    expected = adapter_state_dict(module, name)
    for key, tensor in expected.items():
        if key not in stored:
            raise ValueError(f"{path}: no tensor for {key!r} (layer names differ from the model's)")
        if stored[key].shape != tensor.shape:
            raise ValueError(
                f"{path}: shape mismatch at {key!r}: checkpoint {tuple(stored[key].shape)} vs "
                f"model {tuple(tensor.shape)}"
            )
        if stored[key].is_floating_point() and not torch.isfinite(stored[key]).all():
            raise ValueError(f"{path}: tensor {key!r} has NaN or inf values")
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise ValueError(
            f"{path}: tensor {unexpected[0]!r} has no matching layer in the model ({len(unexpected)} such)"
        )
    for key, tensor in expected.items():
        tensor.copy_(stored[key])


EXTRA_CONFIG = "vlpeft_extra.json"  # the export's side file: what belongs to the VL wrapper
EXTRA_WEIGHTS = "vlpeft_extra.safetensors"


def export_peft_lora(
    module: nn.Module,
    directory: str | os.PathLike,
    name: str = "default",
    prefix: str | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> None:
    """Writes adapter ``name`` as a peft LoRA checkpoint of the bare backbone it sits in, so that
    ``peft.PeftModel.from_pretrained(<that transformers model>, directory)`` gives its outputs.

    The keys are relative to the backbone: the outermost transformers ``PreTrainedModel`` inside
    ``module`` that holds the adapter's layers (CLIP-BART's ``bart``, GPT-2+ViT's ``gpt2``, …), or
    ``module`` itself when it is one or holds none. ``lora_alpha`` is the configured α (B as
    trained, peft's scale α/r), with ``rank_pattern``/``alpha_pattern`` for the layers whose rank
    or α differ from the most common one; a method without an α (Null-LoRA, FLoRA) writes α = r
    with its scale in B. A DoRA adapter adds each layer's magnitude and ``use_dora: true``.
    Declared-trainable parameters inside the backbone are peft ``modules_to_save``; those of the
    VL wrapper outside it (a visual projection, a classifier head) go in the side file
    ``vlpeft_extra.safetensors`` (names relative to ``module``), described by
    ``vlpeft_extra.json`` (``backbone``: the prefix, ``backbone_class``, ``wrapper_class``,
    ``adapter_name``, ``tensors``) — :func:`vlpeft.load_peft_lora` reads both back into the VL
    model; peft ignores them.

    Args:
        module: the model holding the adapter (a VL model or a bare backbone).
        directory: output directory (created).
        name: the adapter to export; LoRA-reducible (LoRA, Null-LoRA, FLoRA-linear) or DoRA.
        prefix: dotted path of the backbone inside ``module`` (None: found as above; ``""``:
            ``module`` itself). An adapter spread over several backbones (BLIP's vision and
            text models) is an error naming them: a peft checkpoint is of one model.
        base_model_name_or_path: recorded in the peft config (default: where the backbone's
            weights came from, its ``name_or_path``; None for random weights).
        task_type: peft's task type (default: from the backbone's class — ``SEQ_2_SEQ_LM`` for an
            encoder-decoder ``…ForConditionalGeneration``, ``CAUSAL_LM`` for ``…LMHeadModel`` /
            ``…ForCausalLM``, ``FEATURE_EXTRACTION`` for a bare text ``…Model``; None otherwise).
    """
    configs = adapter_configs(module)
    if name not in configs:
        raise KeyError(f"no adapter named {name!r}; this module has {sorted(configs)}")
    layers = _peft_layers(module, name)
    if prefix is None:
        prefix = backbone_prefix(module, list(layers))
    lead = prefix + "." if prefix else ""
    backbone = module.get_submodule(prefix) if prefix else module
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    flags: dict[str, Any] = {}
    conv1d = False
    for path, (layer, layer_tensors, scale) in layers.items():
        if not path.startswith(lead):
            raise ValueError(f"layer {path} is outside the backbone prefix {prefix!r}")
        rel = path[len(lead) :]
        rank = layer_tensors["lora_A.weight"].shape[0]
        # peft's saved-state names: the PeftModel prefix, the layer, lora_A / lora_B without the
        # adapter name (what ``get_peft_model_state_dict`` writes and ``from_pretrained`` reads)
        for suffix, tensor in layer_tensors.items():
            unscaled = suffix == "lora_B.weight" and scale != 1
            tensors[f"{PEFT_PREFIX}{rel}.{suffix}"] = tensor / scale if unscaled else tensor
        ranks[rel], alphas[rel] = rank, _number(scale * rank)
        flags.update(layer.adapters[name].peft_flags)
        conv1d |= is_conv1d(layer.base_layer)
    inside, outside = _split_extras(module, trainable_extra_names(module, configs[name]), lead)
    owners = _extra_owner_modules(module, inside, lead)
    for owner in owners:
        for key, tensor in module.get_submodule(lead + owner).state_dict().items():
            tensors[f"{PEFT_PREFIX}{owner}.{key}"] = tensor
    directory = Path(directory)
    write_safetensors(directory / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    source = base_model_name_or_path or getattr(backbone, "name_or_path", None) or None
    config = peft_lora_config(ranks, conv1d, owners, source, alphas=alphas, **flags)
    config["task_type"] = task_type if task_type is not None else peft_task_type(backbone)
    write_json(directory / CONFIG_NAME, config)
    if prefix:
        _write_extra(module, directory, name, prefix, outside)


def _peft_layers(module: nn.Module, name: str) -> dict[str, tuple]:
    """Path → (layer, its peft tensors with the scale in B, that scale) of every layer of adapter
    ``name`` with a nonzero rank; a layer the method cannot write as a peft LoRA is an error."""
    out = {}
    for path, layer in adapted_layers(module):
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        layer_tensors = adapter.peft_tensors(layer.base_layer)  # the method says what it writes
        if layer_tensors is None:
            raise TypeError(
                f"adapter {name!r} at {path} ({type(adapter).__name__}) cannot be written as a plain "
                "peft LoRA (its update is nonlinear or depends on the input)"
            )
        if layer_tensors["lora_A.weight"].shape[0] == 0:
            continue  # a rank-0 layer (Null-LoRA without null space) changes nothing
        scale = float(adapter.factor_scale)
        out[path] = (layer, layer_tensors, scale if math.isfinite(scale) and scale > 0 else 1.0)
    if not out:
        raise ValueError(f"adapter {name!r} has no layer with a nonzero rank: nothing to export")
    return out


def _number(x: float) -> int | float:
    """An α as JSON shows it best: 8, not 8.0 (peft reads either)."""
    return int(x) if float(x).is_integer() else x


def is_pretrained_model(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``PreTrainedModel`` (without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" for c in type(module).__mro__)


def backbone_prefix(module: nn.Module, paths: list[str]) -> str:
    """The dotted path of the one transformers model inside ``module`` that holds the layers at
    ``paths`` (the outermost ``PreTrainedModel`` above each); ``""`` when ``module`` is one or
    when none holds them. Layers in several backbones are an error naming them."""
    if is_pretrained_model(module):
        return ""
    found = []
    for path in paths:
        parts = path.split(".")
        owner = next(
            (
                ".".join(parts[:i])
                for i in range(1, len(parts))
                if is_pretrained_model(module.get_submodule(".".join(parts[:i])))
            ),
            "",
        )
        if owner not in found:
            found.append(owner)
    if len(found) > 1:
        names = [f or f"(outside any: {type(module).__name__})" for f in found]
        raise ValueError(
            f"the adapter's layers sit in several backbones {names}: a peft checkpoint is of one "
            "model — export an adapter placed in one backbone, or use the vlpeft format"
        )
    return found[0] if found else ""


def peft_task_type(backbone: nn.Module) -> str | None:
    """peft's ``task_type`` for a transformers backbone, from its class (None when unclear: peft
    then wraps it in a plain ``PeftModel``)."""
    if not is_pretrained_model(backbone):
        return None
    cls = type(backbone).__name__
    if cls.endswith(("LMHeadModel", "ForCausalLM")):
        return "CAUSAL_LM"
    if cls.endswith("ForConditionalGeneration"):
        encoder_decoder = getattr(backbone.config, "is_encoder_decoder", False)
        return "SEQ_2_SEQ_LM" if encoder_decoder else None
    for suffix, kind in (
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if cls.endswith(suffix):
            return kind
    if cls.endswith("Model") and "input_ids" in inspect.signature(backbone.forward).parameters:
        return "FEATURE_EXTRACTION"  # peft's wrapper passes input_ids: not for a vision model
    return None


def _split_extras(module: nn.Module, extras: list[str], lead: str) -> tuple[list[str], list[str]]:
    """(declared-trainable names inside the backbone, those outside it); an inside one tied to
    another parameter is an error (peft's modules_to_save would copy one of them)."""
    inside = [n for n in extras if n.startswith(lead)]
    aliases: dict[int, list[str]] = {}
    for full, param in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(full)
    params = dict(module.named_parameters())
    for full in inside:
        tied = aliases[id(params[full])]
        if len(tied) > 1:
            raise ValueError(
                f"trained parameter {full} is tied to {[n for n in tied if n != full]}: peft's "
                "modules_to_save copies one module, so the tied copies would keep the old "
                "weights; export this adapter in the vlpeft format instead"
            )
    return inside, [n for n in extras if not n.startswith(lead)]


def _write_extra(
    module: nn.Module, directory: Path, name: str, prefix: str, outside: list[str]
) -> None:
    params = dict(module.named_parameters())
    if outside:
        state = {n: params[n] for n in outside}
        write_safetensors(directory / EXTRA_WEIGHTS, state, metadata={"format": "pt"})
    write_json(
        directory / EXTRA_CONFIG,
        {
            "vlpeft_extra": 1,
            "adapter_name": name,
            "backbone": prefix,
            "backbone_class": type(module.get_submodule(prefix)).__name__,
            "wrapper_class": type(module).__name__,
            "tensors": EXTRA_WEIGHTS if outside else None,
            "names": outside,
        },
    )


def peft_lora_config(
    ranks: dict[str, int],
    fan_in_fan_out: bool,
    modules_to_save: list[str],
    base_model: str | None,
    alphas: dict[str, float] | None = None,
    **flags: Any,
) -> dict[str, Any]:
    """peft's own ``LoraConfig`` of an export, as the dict its ``save_pretrained`` writes: ``r``
    the largest rank, ``lora_alpha`` the most common α; when layers differ in rank (in α), every
    layer is named in ``rank_pattern`` (``alpha_pattern``). ``alphas`` None: α = rank everywhere
    (the scale folded into B); ``flags`` are the methods' own ``LoraConfig`` fields (DoRA:
    ``use_dora=True``)."""
    from peft import LoraConfig  # heavy and optional: only the peft export needs it

    alphas = alphas if alphas is not None else dict(ranks)
    config = LoraConfig(
        r=max(ranks.values()),
        lora_alpha=_most_common(alphas.values()),
        target_modules=sorted(ranks),
        rank_pattern=dict(ranks) if len(set(ranks.values())) > 1 else {},
        alpha_pattern=dict(alphas) if len(set(alphas.values())) > 1 else {},
        lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        modules_to_save=modules_to_save or None,
        init_lora_weights=True,
        base_model_name_or_path=base_model,
        inference_mode=True,
        **flags,
    )
    data = config.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}


def _most_common(values) -> Any:
    """The most frequent value (the smallest of equally frequent ones: deterministic)."""
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return min(counts, key=lambda v: (-counts[v], v))


def _extra_owner_modules(module: nn.Module, param_names: list[str], lead: str) -> list[str]:
    """Dotted names (relative to ``lead``) of the modules that own the declared-trainable parameters."""
    owners: list[str] = []
    for full in param_names:
        owner = full[len(lead) :].rsplit(".", 1)[0]
        if owner not in owners:
            owners.append(owner)
    return owners
