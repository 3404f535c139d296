"""Merging per-task adapters into one: :func:`merge_task_adapters`, with peft's
``add_weighted_adapter`` definitions, so results compare with peft's.

After a multitask run with one adapter set per task (Qu et al. Tab. 8's setting), one adapter for
several tasks: every layer where the sources are LoRA-reducible gets a new plain LoRA ``name``
(scale 1, its own rank per layer). The sources are read through each adapter's
``lora_factors(base_layer)`` (A, B with ΔWᵢ = Bᵢ·Aᵢ: LoRA, Null-LoRA, FLoRA-linear, a merged or
imported adapter) or, for the ``_svd`` methods, its dense ``delta_weight`` — which is where DoRA is
defined too (its ΔW = W' − W0 is not B·A, so the factor methods refuse it). Routed adapters and
bottleneck Adapters are refused: their update is not linear (it depends on x_R, or passes a
nonlinear activation), so there is no ΔW to add.

The methods (wᵢ the weights, sᵢ a LoRA's α/r):

- ``cat`` (the default; exact): A = [w₁A₁; w₂A₂; …], B = [B₁ B₂ …] at the summed rank, so
  ΔW = Σ wᵢ ΔWᵢ.
- ``linear`` (peft's; an approximation): A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ — the
  factors are averaged, so B·A has the cross terms Bᵢ·Aⱼ (i ≠ j) that Σ wᵢΔWᵢ has not; it needs
  equal ranks. (Null-LoRA and FLoRA factors carry their scale: sᵢ = 1 for them.)
- ``svd``: the best rank-``rank`` approximation of Σ wᵢ ΔWᵢ at every layer (default: the largest
  rank any source has at any layer, peft's ``svd_rank or max(source ranks)`` — so two adapters of
  ``rank_pattern`` rank 2 at a layer merge there at their adapters' rank, not truncated to 2; a
  layer narrower than that keeps its full rank, where the merge is exact).
- ``ties``: each source's factors trimmed to their top ``density`` fraction by magnitude, a sign
  elected per entry (the sign of the sum of the trimmed factors), and the weighted factors that
  agree with it averaged (the disjoint mean) — on A and B separately, with linear's weights,
  as peft does.
- ``dare_linear`` / ``dare_ties``: each entry dropped with probability 1 − ``density`` and the rest
  rescaled by 1/density, then summed (``dare_linear``) or sign-elected and disjoint-averaged
  (``dare_ties``). The drops are drawn from one ``torch.Generator`` seeded with ``seed``, layer by
  layer in module order, A's then B's, source by source — the order peft draws them from the
  global generator, so the same seed at the first draw gives peft's masks.
- ``magnitude_prune``: trim to ``density`` as ties, then sum.
- ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the same on the
  dense ΔWᵢ (weights wᵢ), then the rank-``rank`` SVD truncation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from torch import nn

from .adapters import LayerwiseConfig, LoRAConfig
from .adapters.base import AdapterModule, adapted_layers, adapter_configs, is_conv1d
from .inject import add_adapter

log = logging.getLogger(__name__)

__all__ = ["MERGE_METHODS", "combine", "merge_task_adapters"]

FACTOR_METHODS = ("cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
MERGE_METHODS = FACTOR_METHODS + SVD_METHODS
_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}


# -- the elementwise definitions: peft's merge_utils (imported lazily: ``import vlpeft`` stays
# without peft), except DARE's drops, drawn from our seeded generator (peft's use the global RNG)
def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keeps the top ``density`` fraction of entries by magnitude (int(density·numel) of them,
    peft's ``magnitude_based_pruning``); a density that keeps none is an error (the merge would
    be all zeros)."""
    from peft.utils.merge_utils import magnitude_based_pruning

    if density >= 1:
        return t
    if int(density * t.numel()) == 0:
        raise ValueError(
            f"density {density} keeps no entry of a tensor of {t.numel()} "
            f"(int(density·numel) = 0: keeping one needs density >= 1/{t.numel()})"
        )
    return magnitude_based_pruning(t, density)


def _drop(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each entry kept with probability ``density`` (drawn on the CPU from ``generator``),
    the kept ones rescaled by 1/density (peft's ``random_pruning`` with ``rescale``)."""
    if density >= 1:
        return t
    keep = torch.bernoulli(torch.full(t.shape, density, dtype=t.dtype), generator=generator)
    return t * keep.to(t.device) / density


def combine(
    tensors: list[torch.Tensor],
    weights: list[float] | torch.Tensor,
    method: str,
    density: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One merged tensor of same-shaped ``tensors`` by ``method`` (its base name: ``linear``/
    ``svd`` are the weighted sum, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``).
    TIES elects per entry the sign of the sum of the (trimmed, unweighted) tensors and averages
    the weighted entries that agree with it (peft's ``calculate_majority_sign_mask`` and
    ``disjoint_merge``).

    Example:
        >>> a, b = torch.tensor([3.0, -1.0, 0.5]), torch.tensor([-2.0, -2.0, 1.0])
        >>> combine([a, b], [1.0, 1.0], "ties", density=2 / 3)
        tensor([ 3.0000, -1.5000,  0.0000])
    """
    from peft.utils.merge_utils import (
        calculate_majority_sign_mask,
        disjoint_merge,
        reshape_weight_task_tensors,
    )

    kind = method.removesuffix("_svd")
    if kind in ("ties", "magnitude_prune"):
        tensors = [_trim(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [_drop(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    w = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * reshape_weight_task_tensors(stacked, w)
    if kind in ("ties", "dare_ties"):
        return disjoint_merge(weighted, calculate_majority_sign_mask(stacked, method="total"))
    return weighted.sum(dim=0)


# -- per layer -----------------------------------------------------------------------------------
def _check(adapter: AdapterModule, source: str, path: str, method: str) -> None:
    kind = type(adapter).__name__
    if adapter.routing is not None:
        raise TypeError(
            f"adapter {source!r} at {path} is routed ({kind}): its update depends on x_R, so it "
            "is not a linear ΔW and cannot be merged"
        )
    if not adapter.mergeable:
        raise TypeError(
            f"adapter {source!r} at {path} ({kind}) is not linear (a nonlinear bottleneck): it has "
            "no ΔW and cannot be merged"
        )
    if method in FACTOR_METHODS and not adapter.lora_reducible:
        raise TypeError(
            f"adapter {source!r} at {path} ({kind}) has no LoRA factors (its ΔW is not B·A, "
            f"e.g. DoRA): method {method!r} merges factors; use an _svd method, which merges ΔW"
        )


def _scale(adapter: AdapterModule) -> float:
    """The scale that ``lora_factors`` folded into B (the adapter's ``factor_scale``: LoRA's α/r,
    1 for methods without one); a scale ≤ 0 weighs as 1."""
    s = float(adapter.factor_scale)
    return s if s > 0 else 1.0


def _merge_factors(sources, method, density, generator):
    """(A, B) of one layer from [(adapter, weight, base)] by a factor method."""
    factors = [(a.lora_factors(base), w, _scale(a)) for a, w, base in sources]
    if method == "cat":
        a = torch.cat([fa * w for (fa, _), w, _ in factors], dim=0)
        b = torch.cat([fb for (_, fb), _, _ in factors], dim=1)
        return a, b
    ranks = {fa.shape[0] for (fa, _), _, _ in factors}
    if len(ranks) != 1:
        raise ValueError(
            f"method {method!r} needs sources of equal rank, got ranks {sorted(ranks)}"
        )
    # peft's split of each weight over the factors: √|w·s| on both, the sign on A
    wa = [math.copysign(math.sqrt(abs(w * s)), w * s) for _, w, s in factors]
    wb = [math.sqrt(abs(w * s)) for _, w, s in factors]
    a_list = [fa for (fa, _), _, _ in factors]
    b_list = [fb / s for (_, fb), _, s in factors]  # B without the folded scale, as peft's
    a = combine(a_list, wa, method, density, generator)
    b = combine(b_list, wb, method, density, generator)
    return a, b


def _merge_svd(sources, method, density, generator, rank):
    """(A, B) of one layer: the combined dense ΔW truncated by SVD to ``rank``."""
    deltas = [a.delta_weight(base) for a, _, base in sources]
    delta = combine(deltas, [w for _, w, _ in sources], method, density, generator)
    base = sources[0][2]
    shape = delta.shape
    if is_conv1d(base):
        delta = delta.T  # (in, out) → (out, in): the factors are peft's
    matrix = delta.flatten(1).float()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = min(rank, s.numel())
    b, a = (u[:, :k] * s[:k]).to(delta.dtype), vh[:k].to(delta.dtype)
    if isinstance(base, nn.Conv2d):
        return a.view(k, *shape[1:]), b.view(shape[0], k, 1, 1)
    return a, b


def _rank_of(adapter: AdapterModule, base: nn.Module) -> int:
    try:
        return adapter.lora_factors(base)[0].shape[0]
    except TypeError:
        return adapter.rank


def merge_task_adapters(
    module: nn.Module,
    weights: Mapping[str, float],
    method: str = "cat",
    name: str = "merged",
    density: float | None = None,
    rank: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """Adds adapter ``name``: the weighted merge of the adapters named in ``weights``.

    Args:
        module: the model holding the source adapters.
        weights: source adapter name → weight, e.g. ``{"vqa": 1.0, "caption": 0.5}`` (negative
            weights subtract).
        method: one of :data:`MERGE_METHODS` (definitions in the module docstring).
        name: the new adapter's name (an existing name is an error); it is not made active.
        density: the fraction kept by ``ties``, ``dare_*`` and ``magnitude_prune`` (required
            there, in (0, 1]); not used by the others. A density that keeps no entry of a
            tensor, or a merge whose update at a layer is all zeros where a source's is not, is
            an error naming the layer (sources that are all zero there — initialised, untrained
            adapters — merge to zero with a warning).
        rank: the rank of the ``_svd`` methods (default: the largest rank of any source at any
            layer, as peft's).
        seed: seeds DARE's drops.

    Returns:
        ``module``, with the merged adapter: a plain LoRA (a :class:`LayerwiseConfig` when layers
        differ in rank) that saves, loads and exports like any other. Its declared-trainable
        parameters are the union of the sources' (shared module parameters, not copies).

    Example:
        >>> vlpeft.merge_task_adapters(model, {"vqa": 1.0, "caption": 0.5}, method="ties",
        ...                            density=0.5)  # doctest: +SKIP
        >>> vlpeft.set_active_adapter(model, "merged")  # doctest: +SKIP
    """
    configs = adapter_configs(module)
    _validate(configs, weights, method, name, density, rank)
    layers = _sources(module, weights, method)
    if rank is None and method in SVD_METHODS and layers:
        rank = max(_rank_of(a, b) for sources in layers.values() for a, _, b in sources)
    generator = torch.Generator().manual_seed(seed)
    untrained: list[str] = []
    merged = {
        path: _merge_layer(path, sources, method, density, generator, rank, untrained)
        for path, sources in layers.items()
    }
    if untrained:
        log.warning(
            "merge_task_adapters: the sources %s change nothing in %d of %d layers (e.g. %s: "
            "initialised, untrained adapters); so does the merge there",
            sorted(weights),
            len(untrained),
            len(layers),
            untrained[0],
        )
    merged = {p: f for p, f in merged.items() if f[0].shape[0] > 0}
    if not merged:
        raise ValueError(f"adapters {sorted(weights)} have no layer with a nonzero rank to merge")
    trainable = [p for n in weights for p in configs[n].trainable]
    add_adapter(module, _merged_config(merged, list(dict.fromkeys(trainable))), name)
    with torch.no_grad():
        for path, (a, b) in merged.items():
            adapter = module.get_submodule(path).adapters[name]
            adapter.lora_A.copy_(a)
            adapter.lora_B.copy_(b)
    return module


def _sources(module: nn.Module, weights: Mapping[str, float], method: str) -> dict[str, list]:
    """Layer path → [(adapter, weight, base layer)] of the sources there, each checked to be
    mergeable by ``method``; layers with no source, or only rank-0 ones (Null-LoRA without null
    space), are left out."""
    layers = {}
    for path, layer in adapted_layers(module):
        sources = []
        for n, w in weights.items():
            if n in layer.adapters:
                _check(layer.adapters[n], n, path, method)
                sources.append((layer.adapters[n], float(w), layer.base_layer))
        if any(_rank_of(a, b) > 0 for a, _, b in sources):
            layers[path] = sources
    return layers


def _merge_layer(path: str, sources, method, density, generator, rank, untrained: list[str]):
    """(A, B) of the layer at ``path``; an error naming the layer, the method and the density
    when the merge fails there or its update B·A is all zeros (an adapter that changes nothing)
    although a source's is not — where every source's ΔW is zero (initialised, untrained
    adapters), the path is added to ``untrained`` instead."""
    what = f"method {method!r}" + (f" at density {density}" if density is not None else "")
    try:
        if method in FACTOR_METHODS:
            a, b = _merge_factors(sources, method, density, generator)
        else:
            a, b = _merge_svd(sources, method, density, generator, rank)
    except ValueError as err:
        raise ValueError(f"merge_task_adapters at {path} ({what}): {err}") from None
    if a.shape[0] > 0 and not torch.any(b.flatten(1) @ a.flatten(1)):
        if not any(torch.any(src.delta_weight(base)) for src, _, base in sources):
            untrained.append(path)  # the sources change nothing here: neither does the merge
            return a, b
        hint = "raise the density, or check" if density is not None else "check"
        raise ValueError(
            f"merge_task_adapters at {path}: {what} gives an all-zero update (the merged adapter "
            f"would change nothing here): {hint} the weights and the sources"
        )
    return a, b


def _validate(configs, weights, method, name, density, rank) -> None:
    if not weights:
        raise ValueError("merge_task_adapters: name at least one source adapter and its weight")
    unknown = [n for n in weights if n not in configs]
    if unknown:
        raise KeyError(f"no adapter named {unknown[0]!r}; this module has {sorted(configs)}")
    for n, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise ValueError(f"the weight of {n!r} must be a finite number, got {w!r}")
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {list(MERGE_METHODS)}")
    if name in configs:
        raise ValueError(f"adapter {name!r} already exists; names in use: {sorted(configs)}")
    needs_density = method.removesuffix("_svd") in _DENSITY
    real = not isinstance(density, bool) and isinstance(density, int | float)
    if needs_density and not (real and math.isfinite(density) and 0 < density <= 1):
        raise ValueError(f"method {method!r} needs density in (0, 1], got {density!r}")
    if not needs_density and density is not None:
        raise ValueError(f"density is used by ties, dare and magnitude_prune, not by {method!r}")
    if rank is not None and method not in SVD_METHODS:
        raise ValueError(f"rank is the rank of the _svd methods, not of {method!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")


def _merged_config(merged: dict, trainable: list[str]):
    """A LoRA at scale 1 (α = r) on the merged layers; per-layer ranks when they differ."""
    ranks = {p: a.shape[0] for p, (a, _) in merged.items()}
    targets = list(merged)
    top = max(ranks.values())
    if len(set(ranks.values())) == 1:
        return LoRAConfig(targets=targets, trainable=trainable, r=top, alpha=float(top))
    base = LoRAConfig(targets=targets, r=top).to_dict()
    alphas = {p: float(r) for p, r in ranks.items()}
    return LayerwiseConfig(
        targets=targets, trainable=trainable, base=base, ranks=ranks, alphas=alphas
    )
