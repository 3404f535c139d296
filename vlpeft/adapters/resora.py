"""ReSoRA (Zhu et al., ACM MM 2025): a training regulariser against redundancy between the rank-1
subspaces of an adapter. It adds no layer and no inference cost.

An adapter's output increment splits into rank-1 components Δh_i = b_i·z_i (Eq. 3-4): b_i the i-th
up-projection column, z_i the i-th bottleneck activation. Over N samples (token positions, or one
pooled vector per example), with z ∈ R^{N×r} and b ∈ R^{d_out×r}, the penalties are sums over pairs
i < j and reduce to r×r Gram matrices — the d_out-sized Δh_i are never built:

- ``euclidean`` (Eq. 5): (1/N) Σ_n Σ_{i<j} exp(-β‖Δh_i^n − Δh_j^n‖²) with
  ‖Δh_i^n − Δh_j^n‖² = z_ni²·G_ii + z_nj²·G_jj − 2·z_ni·z_nj·G_ij, G = bᵀb (O(N·r²), not O(N·r²·d)).
- ``cosine`` (Eq. 6): cos(b_i z_ni, b_j z_nj) = sign(z_ni z_nj)·cos(b_i, b_j), so the penalty is
  Σ_{i<j} Ĝ_ij·(SᵀS/N)_ij with Ĝ the cosine Gram of b and S = sign(z).
- ``linear`` (Eq. 7, the default), with ΔH_i = b_i z_iᵀ ∈ R^{d_out×N}: the ratio
  ‖ΔH_i ΔH_jᵀ‖²_F / (‖ΔH_i ΔH_iᵀ‖_F ‖ΔH_j ΔH_jᵀ‖_F) equals cos²(z_i, z_j): Σ_{i<j} K_ij²/(K_ii K_jj), K = zᵀz.
- ``kernel`` (Eq. 8): centred-kernel alignment Σ_{i<j} tr(K_i M K_j M)/√(tr((K_i M)²) tr((K_j M)²))
  with K_i(p, q) = exp(−‖Δh_i^p − Δh_i^q‖²/(2σ_i²)) and σ_i = ``sigma_frac`` × the median pairwise
  distance (treated as a constant). The paper's "σ … a fraction of the median sample distances"
  names one σ; we read it per subspace (each K_i on its own scale, default) and offer
  ``sigma="shared"``: one σ from the median over all subspaces' distances. Since ‖Δh_i^p − Δh_i^q‖ = ‖b_i‖·|z_pi − z_qi| and σ_i scales with
  ‖b_i‖, K_i depends on z only. Costs O(r·N²): N is subsampled to ``max_samples`` with a fixed seed.
  Per layer, with n = min(N, ``max_samples``) and rank r: about 4·r·n² floats of memory (the squared
  differences, the kernels, their centred copies, all r × n × n) and r²·n² + 10·r·n² flops;
  :func:`kernel_cost` gives the figures (r = 8, n = 256: 8 MiB and 9.4 MFLOP; n = 512: 32 MiB, 38 MFLOP).

``samples="weight"`` is the weight-level variant: the components of ΔW = Σ_i b_i a_iᵀ themselves,
i.e. the penalties with z = Aᵀ (the increments for the basis inputs e_k), which needs no forward data.

**The recorder.** :func:`enable_resora` attaches a :class:`Recorder` to the adapted layers of a
model. It keeps (z, b, padding mask) of every call of an active adapter made in training mode with
grad enabled — all calls of a layer since the last penalty (so both calls of a layer called twice in
one forward: BLIP's text encoder for ITC, then ITM), but not a gradient-checkpointing recompute of a
call already kept, and nothing from an evaluation or ``no_grad`` pass. Reentrant checkpointing runs
the first forward without grad, so nothing can be kept: the penalty is then an error that says so
(use ``use_reentrant=False``). The padding mask of each call is the one the model set on that
layer for that forward (:func:`set_token_masks`, per component); nothing is matched by shape.
:func:`resora_penalty` takes what was kept since its last call: each layer's calls become one
sample set, the penalty is λ × the mean (``reduction="sum"``: the sum) over the layers; before
``start_step`` it is 0 (the paper's two-stage schedule). Layers of one shape are penalised in one
batched call per kind; nothing in it waits for the device: a padding mask enters as 0/1 sample
weights (the same value as selecting the real rows, which would need the count on the host), and
the kernel kind's subsample is drawn on the samples' device (a permutation of the real rows). Asking for an activation-level penalty of a
model whose recorder was never enabled is an error naming :func:`enable_resora`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, check_finite
from .base import AdaptedLayer, AdapterModule, adapted_layers, set_layer_context

KINDS = ("euclidean", "cosine", "linear", "kernel")
SAMPLES = ("tokens", "pooled", "weight")
REDUCTIONS = ("mean", "sum")
EPS = 1e-12


@dataclasses.dataclass
class ReSoRAConfig(Config):
    """ReSoRA regulariser settings.

    Args:
        kind: euclidean, cosine, linear (default) or kernel.
        weight: λ, the loss weight of the penalty.
        start_step: the penalty is 0 before this training step (two-stage schedule).
        samples: "tokens" (every non-padding position), "pooled" (one mean vector per example) or
            "weight" (weight-level components, no activations).
        beta: β of the euclidean kind.
        sigma_frac: σ of the kernel kind as a fraction of the median pairwise distance.
        sigma: "per_subspace" (each K_i its own σ_i, default) or "shared" (one σ over all).
        max_samples: cap on N for the kernel kind (subsampled with a fixed seed).
        seed: seed of that subsampling.
        reduction: "mean" (default) or "sum" over the adapter layers.
    """

    kind: str = "linear"
    weight: float = 0.1
    start_step: int = 0
    samples: str = "tokens"
    beta: float = 1.0
    sigma_frac: float = 0.5
    sigma: str = "per_subspace"
    max_samples: int = 512
    seed: int = 0
    reduction: str = "mean"

    def __post_init__(self) -> None:
        check_finite(self)
        if self.sigma not in ("per_subspace", "shared"):
            raise ValueError(
                f"ReSoRAConfig.sigma must be 'per_subspace' or 'shared', got {self.sigma!r}"
            )
        if self.reduction not in REDUCTIONS:
            raise ValueError(
                f"ReSoRAConfig.reduction must be one of {list(REDUCTIONS)}, got {self.reduction!r}"
            )
        if self.kind not in KINDS:
            raise ValueError(f"ReSoRAConfig.kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.samples not in SAMPLES:
            raise ValueError(
                f"ReSoRAConfig.samples must be one of {list(SAMPLES)}, got {self.samples!r}"
            )
        if self.weight < 0 or self.start_step < 0 or self.max_samples < 2 or self.sigma_frac <= 0:
            raise ValueError(
                "ReSoRAConfig needs weight >= 0, start_step >= 0, max_samples >= 2, sigma_frac > 0"
            )

    def params(self) -> dict:
        return {
            "beta": self.beta,
            "sigma_frac": self.sigma_frac,
            "shared_sigma": self.sigma == "shared",
            "max_samples": self.max_samples,
            "seed": self.seed,
        }


def _pair_sum(m: torch.Tensor) -> torch.Tensor:
    """Σ_{i<j} m_ij of (..., r, r) square matrices: (...)."""
    return torch.triu(m, diagonal=1).sum((-2, -1))


def _cos_gram(m: torch.Tensor) -> torch.Tensor:
    """Cosine Gram of the columns of (..., n, r) matrices: (..., r, r)."""
    n = F.normalize(m, dim=-2, eps=EPS)
    return n.mT @ n


def subsample(z: torch.Tensor, cap: int, seed: int) -> torch.Tensor:
    """At most ``cap`` rows (dim -2) of z, chosen with a fixed generator (all when N ≤ cap). The
    permutation is drawn on z's device (no host-to-device copy; a GPU draws another fixed subset
    than the CPU)."""
    if z.shape[-2] <= cap:
        return z
    generator = torch.Generator(device=z.device).manual_seed(seed)
    idx = torch.randperm(z.shape[-2], generator=generator, device=z.device)[:cap]
    return z[..., idx, :]


def _subsample_weighted(
    z: torch.Tensor, w: torch.Tensor, cap: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``cap`` rows of z (..., N, r) drawn from those of weight 1 (w (..., N) of 0/1),
    without reading the count on the host: the rows are ordered by a fixed random key with the
    weight-0 rows last, and the first ``cap`` are kept with their weights."""
    if z.shape[-2] <= cap:
        return z, w
    generator = torch.Generator(device=z.device).manual_seed(seed)
    key = torch.rand(z.shape[-2], generator=generator, device=z.device).expand_as(w)
    order = torch.where(w > 0, key, key + 2).argsort(dim=-1)[..., :cap]
    return z.gather(-2, order[..., None].expand(*order.shape, z.shape[-1])), w.gather(-1, order)


def kernel_cost(rank: int, samples: int, max_samples: int = 512, bytes_per_float: int = 4) -> dict:
    """What the kernel kind costs per layer per penalty: n = min(samples, max_samples) samples,
    ``rank`` subspaces. Returns ``{"samples": n, "bytes": …, "flops": …}`` (the r × n × n squared
    differences, kernels and centred kernels plus the r·n² alignment operand; the kernels' and
    centring's ~10 elementwise flops per entry and the r × r alignment Gram's r²·n²)."""
    n = min(samples, max_samples)
    entries = rank * n * n
    return {
        "samples": n,
        "bytes": 4 * entries * bytes_per_float,
        "flops": 10 * entries + rank * entries,
    }


def _pair_median(sq: torch.Tensor) -> torch.Tensor:
    """Median over pairs p < q of (..., r, N, N) symmetric matrices, detached: (..., r)."""
    n = sq.shape[-1]
    iu = torch.triu_indices(n, n, offset=1, device=sq.device)
    return sq.detach()[..., iu[0], iu[1]].median(dim=-1).values


def _centered_alignment(k: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Σ_{i<j} HSIC(K_i, K_j)/√(HSIC_ii HSIC_jj) for kernels k (..., r, N, N), centring in closed
    form. (Expanding tr(K_i M K_j M) into uncentred Gram terms avoids the centred copies but loses
    ~2 % to cancellation in float32 at N = 512: not done.)"""
    kc = k - k.mean(-1, keepdim=True) - k.mean(-2, keepdim=True) + k.mean((-1, -2), keepdim=True)
    flat = kc.flatten(-2)
    t = flat @ flat.mT  # tr(K_i M K_j M) = <M K_i M, M K_j M>
    d = t.diagonal(dim1=-2, dim2=-1).clamp_min(EPS).sqrt()
    return _pair_sum(t / (d[..., :, None] * d[..., None, :]) * pairs)


def _live_pairs(z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., r, r) 1 where both components carry an increment, else 0. A component whose b_i is
    zero (a zero-initialised LoRA B) or whose z_i is zero over the samples has Δh_i = 0: its pairs
    are 0/0 in Eq. 7 and contribute nothing (and no gradient) to any kind."""
    live = (b.detach().square().sum(-2) > 0) & (z.detach().square().sum(-2) > 0)
    return (live[..., :, None] & live[..., None, :]).to(z.dtype)


def subspace_penalty(
    z: torch.Tensor,
    b: torch.Tensor,
    kind: str = "linear",
    weights: torch.Tensor | None = None,
    **params,
) -> torch.Tensor:
    """ReSoRA redundancy penalty of the rank-1 components Δh_i = b_i z_i, from r×r Gram matrices.

    Args:
        z: (..., N, r) bottleneck activations over N samples.
        b: (..., d_out, r) up-projection columns (the same leading dimensions: a batch of layers
            of one shape, penalised in one set of kernels).
        kind: euclidean, cosine, linear or kernel.
        weights: (..., N) 0/1 sample weights (a padding mask): the penalty of the rows of weight
            1, without selecting them (no host synchronisation). None: every row.
        **params: beta (euclidean), sigma_frac, shared_sigma, max_samples, seed (kernel).

    Returns:
        A tensor of the leading shape (a scalar for 2-D inputs), differentiable in z and b. Pairs
        with a component that carries no increment (b_i = 0 or z_i = 0) contribute 0.

    Example:
        >>> z = torch.tensor([[1.0, 2.0], [2.0, 4.0]])  # both columns parallel: fully redundant
        >>> subspace_penalty(z, torch.eye(2), "linear")
        tensor(1.)
    """
    if (
        z.dim() < 2
        or z.dim() != b.dim()
        or z.shape[-1] != b.shape[-1]
        or z.shape[:-2] != b.shape[:-2]
    ):
        raise ValueError(
            f"subspace_penalty needs z (..., N, r) and b (..., d_out, r), got {tuple(z.shape)} and {tuple(b.shape)}"
        )
    if weights is not None and weights.shape != z.shape[:-1]:
        raise ValueError(
            f"subspace_penalty: weights {tuple(weights.shape)} must be z's leading shape {tuple(z.shape[:-1])}"
        )
    dtype = torch.promote_types(torch.promote_types(z.dtype, b.dtype), torch.float32)
    z, b = z.to(dtype), b.to(dtype)
    if weights is not None:
        weights = weights.to(dtype)
        if kind != "kernel":  # a row of weight 0 adds nothing to a Gram matrix or a sign product
            z = z * weights[..., None]
    count = z.shape[-2] if weights is None else weights.sum(-1).clamp_min(1)[..., None, None]
    pairs = _live_pairs(z, b)
    if kind == "linear":
        return _pair_sum(_cos_gram(z) ** 2 * pairs)
    if kind == "cosine":
        s = torch.sign(z)
        return _pair_sum(_cos_gram(b) * (s.mT @ s) / count * pairs)
    if kind == "euclidean":
        g = b.mT @ b  # (..., r, r)
        sq = z.square() * g.diagonal(dim1=-2, dim2=-1)[..., None, :]  # z_ni² G_ii
        cross = z[..., :, :, None] * z[..., :, None, :] * g[..., None, :, :]  # (..., N, r, r)
        dist = (sq[..., :, :, None] + sq[..., :, None, :] - 2 * cross).clamp_min(0)
        close = torch.exp(-params.get("beta", 1.0) * dist)
        if weights is None:
            return _pair_sum(close.mean(-3) * pairs)
        return _pair_sum((close * weights[..., :, None, None]).sum(-3) / count * pairs)
    if kind == "kernel" and weights is not None:
        return _kernel_weighted(z, b, weights, pairs, params)
    if kind == "kernel":
        z = subsample(z, params.get("max_samples", 512), params.get("seed", 0))
        zt = z.mT  # (..., r, N)
        sq = (zt[..., :, :, None] - zt[..., :, None, :]).square()  # (z_pi − z_qi)²: (..., r, N, N)
        # ‖Δh_i^p − Δh_i^q‖² = ‖b_i‖²·(z_pi − z_qi)², and σ_i = sigma_frac × their median (a
        # constant) = sigma_frac·‖b_i‖·√median((z_pi − z_qi)²): K_i = exp(sq·c_i), one scale per
        # subspace, instead of building the distances, their square and the quotient N × N-sized
        norms2 = b.square().sum(-2)  # (..., r), with gradient
        if params.get("shared_sigma", False):  # one σ: the median over every subspace's distances
            n = sq.shape[-1]
            iu = torch.triu_indices(n, n, offset=1, device=sq.device)
            dist2 = (sq.detach() * norms2.detach()[..., None, None])[..., iu[0], iu[1]]
            live = pairs.diagonal(dim1=-2, dim2=-1).bool()  # components with an increment only
            dist2 = dist2.masked_fill(~live[..., None], float("nan"))
            shared = dist2.flatten(-2).nanmedian(dim=-1).values.sqrt()  # (...)
            sigma = params.get("sigma_frac", 0.5) * shared[..., None].expand_as(norms2)
        else:
            sigma = params.get("sigma_frac", 0.5) * norms2.detach().sqrt() * _pair_median(sq).sqrt()
        scale = -norms2 / (2 * sigma.clamp_min(EPS) ** 2)
        return _centered_alignment(torch.exp(sq * scale[..., None, None]), pairs)
    raise ValueError(f"unknown ReSoRA kind {kind!r}; choose one of {list(KINDS)}")


def _kernel_weighted(z, b, weights, pairs, params) -> torch.Tensor:
    """The kernel kind over the rows of weight 1: subsampled among them on the device, the median
    over pairs of real rows, the centring over real rows, padding rows and columns zeroed — what
    the unweighted kind gives on the selected rows, to the subsample drawn."""
    z, w = _subsample_weighted(z, weights, params.get("max_samples", 512), params.get("seed", 0))
    zt = z.mT  # (..., r, n)
    sq = (zt[..., :, :, None] - zt[..., :, None, :]).square()  # (..., r, n, n)
    norms2 = b.square().sum(-2)
    real = (w[..., :, None] * w[..., None, :]).bool()  # (..., n, n) pairs of real rows
    n = sq.shape[-1]
    upper = torch.ones(n, n, dtype=torch.bool, device=sq.device).triu(1)
    usable = (real & upper)[..., None, :, :].expand_as(sq)
    pair_sq = sq.detach().masked_fill(~usable, float("nan"))
    if params.get("shared_sigma", False):
        live = pairs.diagonal(dim1=-2, dim2=-1).bool()
        dist2 = (pair_sq * norms2.detach()[..., None, None]).masked_fill(
            ~live[..., None, None], float("nan")
        )
        shared = dist2.flatten(-3).nanmedian(dim=-1).values.sqrt()
        sigma = params.get("sigma_frac", 0.5) * shared[..., None].expand_as(norms2)
    else:
        median = pair_sq.flatten(-2).nanmedian(dim=-1).values
        sigma = params.get("sigma_frac", 0.5) * norms2.detach().sqrt() * median.sqrt()
    scale = -norms2 / (2 * sigma.clamp_min(EPS) ** 2)
    k = torch.exp(sq * scale[..., None, None])
    # the centring means run over real rows only: w_q weights column q, w_p row p
    count = w.sum(-1).clamp_min(1)[..., None, None, None]
    row = (k * w[..., None, None, :]).sum(-1, keepdim=True) / count  # (..., r, n, 1)
    total = (row * w[..., None, :, None]).sum(-2, keepdim=True) / count  # (..., r, 1, 1)
    kc = (k - row - row.mT + total) * real[..., None, :, :]
    flat = kc.flatten(-2)
    t = flat @ flat.mT
    d = t.diagonal(dim1=-2, dim2=-1).clamp_min(EPS).sqrt()
    return _pair_sum(t / (d[..., :, None] * d[..., None, :]) * pairs)


def set_token_masks(
    module: nn.Module, masks: torch.Tensor | dict[str, torch.Tensor | None] | None
) -> None:
    """Sets which input positions of ``module``'s adapted layers are real, for ReSoRA's samples,
    until the next call: one (B, L) mask for every layer, or a dict of module paths relative to
    ``module`` → masks (longest prefix wins; None: every position is real). The VL models set the
    mask of each component's own sequence in their forward (text padding; cross-attention keys and
    values read the other sequence)."""
    if isinstance(masks, dict):
        masks = {k: (None if m is None else m.bool()) for k, m in masks.items()}
    elif masks is not None:
        masks = masks.bool()
    set_layer_context(module, "token_mask", masks)


def samples_from_activations(
    z: torch.Tensor, mode: str, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, r) samples from recorded activations (..., L, r): non-padding tokens, or per-example means."""
    if z.dim() == 2:
        return z
    if mode == "tokens":  # without a mask a reshape (boolean indexing synchronises a GPU)
        return z[mask] if mask is not None else z.reshape(-1, z.shape[-1])
    if mask is None:
        return z.mean(-2).reshape(-1, z.shape[-1])
    m = mask.to(z.dtype).unsqueeze(-1)
    pooled = (z * m).sum(-2) / m.sum(-2).clamp_min(1)
    return pooled.reshape(-1, z.shape[-1])


class Recorder:
    """What the adapted layers of one model handed over since the last :meth:`take`: per
    (layer, adapter), the (z, mask) of each call and the up-projection columns b."""

    def __init__(self) -> None:
        self.calls: dict[int, tuple[AdaptedLayer, AdapterModule, list, torch.Tensor]] = {}
        self.missed = 0  # training-mode calls of active adapters made without grad

    def add(
        self,
        layer: AdaptedLayer,
        adapter: AdapterModule,
        z: torch.Tensor,
        b: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> None:
        key = id(adapter)
        if key in self.calls:
            self.calls[key][2].append((z, mask))
        else:
            self.calls[key] = (layer, adapter, [(z, mask)], b)

    def take(self, layers: set[int] | None = None) -> list[tuple[AdaptedLayer, list, torch.Tensor]]:
        """The kept calls (of the layers whose ids are in ``layers``; all when None), released."""
        out, kept = [], {}
        for key, (layer, adapter, calls, b) in self.calls.items():
            if layers is None or id(layer) in layers:
                out.append((layer, calls, b))
            else:
                kept[key] = (layer, adapter, calls, b)
        self.calls = kept
        self.missed = 0
        return out

    def __len__(self) -> int:
        return sum(len(c[2]) for c in self.calls.values())


def enable_resora(module: nn.Module, enabled: bool = True) -> None:
    """Attaches a recorder to every adapted layer of ``module`` (``enabled=False``: detaches it;
    nothing is then kept and the layers pay nothing). Adapters added later join the recorder."""
    layers = list(adapted_layers(module))
    for path, layer in layers:
        for name, adapter in layer.adapters.items():
            if enabled and not adapter.records:
                raise TypeError(
                    f"ReSoRA cannot regularise adapter {name!r} at {path} "
                    f"({type(adapter).__name__}): its update has no rank-1 components"
                )
    recorder = Recorder() if enabled else None
    for _, layer in layers:
        layer.recorder = recorder


def recorder_of(module: nn.Module) -> Recorder | None:
    """The recorder attached to ``module``'s adapted layers by :func:`enable_resora` (or None)."""
    for _, layer in adapted_layers(module):
        if layer.recorder is not None:
            return layer.recorder
    return None


def _layer_samples(config: ReSoRAConfig, module: nn.Module, active: bool):
    """(z (N, r), b) per adapter layer for the penalty; releases the recorder's calls."""
    recorder = recorder_of(module)
    layers = {id(layer) for _, layer in adapted_layers(module)}
    missed = recorder.missed if recorder is not None else 0
    calls = recorder.take(layers) if recorder is not None else []
    if config.samples == "weight":
        if not active:
            return []
        return [
            (*layer.adapters[name].weight_components(layer.base_layer), None)
            for _, layer in adapted_layers(module)
            for name in layer.active
            if name in layer.adapters
        ]
    if recorder is None:
        raise RuntimeError(
            "resora_penalty: ReSoRA was not enabled on this model, so no activations were "
            "recorded; call vlpeft.enable_resora(model) before the training forward (or use "
            "samples='weight', which needs none)"
        )
    if not calls and missed:
        raise RuntimeError(
            f"resora_penalty: the adapters ran {missed} time(s) in training mode without grad and "
            "nothing was recorded; reentrant gradient checkpointing runs the forward without grad "
            "(use gradient_checkpointing_kwargs={'use_reentrant': False}), and a torch.no_grad() "
            "pass has no penalty to train"
        )
    if not active:
        return []
    out = []
    for _, layer_calls, b in calls:
        samples = [_weighted_samples(z, config.samples, mask) for z, mask in layer_calls]
        zs, ws = zip(*samples)
        if all(w is None for w in ws):
            weights = None
        else:
            weights = torch.cat(
                [w if w is not None else z.new_ones(z.shape[0]) for z, w in samples]
            )
        out.append((zs[0] if len(zs) == 1 else torch.cat(zs), b, weights))
    return out


def _weighted_samples(
    z: torch.Tensor, mode: str, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, r) samples and their 0/1 weights (None: all real) from recorded activations: the
    token mode keeps every position and weights the padding 0 (no boolean indexing, which
    synchronises a GPU), the pooled mode averages the real positions of each example."""
    if mode == "tokens" and mask is not None and z.dim() > 2:
        return z.reshape(-1, z.shape[-1]), mask.reshape(-1)
    return samples_from_activations(z, mode, mask), None


def resora_penalty(
    module: nn.Module, config: ReSoRAConfig, step: int | None = None
) -> torch.Tensor:
    """λ × the mean (or sum) ReSoRA penalty over the adapter layers recorded since the last call.

    Args:
        module: the adapted model; for activation samples, :func:`enable_resora` was called on it
            and a training forward ran since the last penalty.
        config: the regulariser settings.
        step: the current training step, for ``start_step``; None applies the penalty.

    Returns:
        A scalar tensor (0 before ``start_step`` or when no layer has a component pair).
    """
    active = step is None or step >= config.start_step
    groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for z, b, w in _layer_samples(config, module, active):
        if z.shape[1] >= 2 and z.shape[0] >= 1:
            key = (tuple(z.shape), tuple(b.shape), z.dtype, b.dtype, z.device, w is None)
            groups.setdefault(key, []).append((z, b, w))
    if not groups:
        return torch.zeros(())
    # layers of one shape are penalised together: a few batched kernels instead of a few per
    # layer (on a GPU the per-layer version is bound by kernel launches)
    total, count = 0, 0
    for members in groups.values():
        zs, bs, ws = zip(*members)
        weights = None if ws[0] is None else ws
        if len(members) == 1:
            weights = weights and weights[0]
            total = total + subspace_penalty(zs[0], bs[0], config.kind, weights, **config.params())
        else:
            weights = weights and torch.stack(weights)
            stacked = subspace_penalty(
                torch.stack(zs), torch.stack(bs), config.kind, weights, **config.params()
            )
            total = total + stacked.sum()
        count += len(members)
    return config.weight * (total / count if config.reduction == "mean" else total)
