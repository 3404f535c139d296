"""Null-LoRA (Zhang et al., 2025): low-rank adaptation in the null space of the pre-trained weight.

For W0 (d_out × d_in) with SVD U Σ Vᵀ, Û (d_out × h) spans the left null space (W0ᵀ Û = 0) and
V̂ᵀ (h × d_in) the right one (W0 V̂ = 0). With frozen B_f = Û, A_f = V̂ᵀ and trainable B (d_out × h),
A (h × d_in) zero-initialised and s ∈ R^{2h} (ones), Eq. (3) and (10) give

    ΔW = P·B·diag(s₁)·A_f + B_f·diag(s₂)·A,      P = Û Ûᵀ,

so W0ᵀ ΔW = 0 (Eq. 7): the update never touches the output directions W0 already uses. P is never
formed: P·B = Û(ÛᵀB). The forward never builds ΔW either; it is the rank-2h LoRA with
A_eq = [diag(s₁)A_f; diag(s₂)A] and B_eq = [P·B, B_f].

Rank self-adaptation (Sec. 3.2): "the rank of each incremental update is set to twice the nullity
of its corresponding pre-trained weight", with no clipping: the layer's rank is r = 2h with
h = min(left nullity, right nullity) (Û and V̂ᵀ have h columns/rows each). A nullity counts the
singular values that are zero to the precision the weight is stored in, plus the structural null
directions of a non-square W0 on that side. A layer with no null space gets rank 0: no update
(our reading of what the paper implies; the rank report lists it:
:func:`vlpeft.adapters.nulllora_report.rank_report`).

"Zero to the storage precision": rounding every entry of W0 to a format with unit roundoff u
perturbs it by E with ‖E‖₂ ≤ ‖E‖_F ≤ u·‖W0‖_F, so by Weyl's inequality a singular value that is
exactly zero becomes at most u·‖W0‖_F. Under that bound the null space is cut at the spectral gap
(the largest ratio between neighbouring singular values, at least 8×): the bound alone would also
take small real singular values, since rounding errors are much smaller in ‖·‖₂ than ‖·‖_F. The
format is the
narrowest of bfloat16, float16 and float32 that holds every entry of W0 exactly (a bf16 checkpoint
upcast to float32 is still found to be bf16), unless ``storage_dtype`` names it; ``rtol`` instead
counts singular values ≤ rtol·σ_max. (A planted nullity of 16 in a bf16 weight is found as 16; a
threshold relative to float32 found 0.)

Near-null fill, an explicit option: ``min_rank`` fills a layer up to that rank with the directions
of its smallest singular values. Their update is not in the null space: W0ᵀΔW ≠ 0, bounded by
|W0ᵀΔW| ≤ (σ_k/σ_max)·|W0|·|ΔW| with σ_k the largest singular value used; the report gives that
ratio per layer (``null_leak``, 0 for an exact null space). ``max_rank`` caps a layer's rank.

"Without null space" (Tab. 3, an explicit option): ``frozen_halves="random"`` replaces the
null-space bases by seeded random orthonormal ones of the same sizes (Û: d_out × h, V̂ᵀ: h × d_in,
drawn per layer from ``random_seed``, the layer's name and shape), everything else unchanged: the
ranks are still 2 × nullity (Tab. 3 gives both variants 9.5M), P = B_f·B_fᵀ (Eq. 9 with Û := B_f),
A, B zero and s one at the start. The update then leaves the null space: ``null_leak`` is
‖W0ᵀ·B_f‖₂ / ‖W0‖₂, the same bound as above (our reading of "randomly initialized frozen matrices":
the paper does not say whether P stays; keeping it changes only the subspace, not the structure).

With ``routing`` (Qu et al. 2024, composed as for every bottleneck method) the 2h-wide bottleneck z
is routed with the same map of x_R, z_v = [diag(s₁)·A_f·x_R, diag(s₂)·A·x_R] (or a separate
trainable map ``lora_A_visual``, initialised like [A_f; A]: orthonormal-random rows then zeros, so
the routed branch starts at zero too); the branch is B_eq·route(z, z_v). A routed Null-LoRA depends
on the input, so it is neither mergeable nor exported to peft.

**The fused forward** (plain Null-LoRA, eager, not recording for ReSoRA). The parameters stay
A, B, s (the same count, the same state-dict keys, the same training dynamics), but the forward is
LoRA's: two GEMMs with the add folded into the second, y + (x·A_eqᵀ)·B_eqᵀ, inside one autograd
function whose backward is written out (8 operators: gz = g·B_eq, grad x, G = gzᵀ·x, grad A = s₂∘G₂,
grad s = rowsum(G∘[A_f; A]) as one bmm, grad B = Û·((g·Û)ᵀ·z₁) from gz's second half). A_eq and
B_eq are built without autograd at every forward, in the compute dtype (autocast's when it is on),
and never cached across forwards: a write through ``.data`` or another view of a parameter
(DeepSpeed ZeRO-1/2's flat buffers, ``load_adapter``) changes neither its address nor its version
counter, so no cheap key could tell a stale cache from a fresh one (:meth:`NullLoRALinear.factors`).
Routed, recording and compiled forwards take the
differentiable path (``bottleneck``/``up_columns``), which torch.compile fuses itself.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check
from ..tensor_cache import cached, content_key
from .base import (
    AdaptedLayer,
    AdapterModule,
    gathered,
    is_conv1d,
    linear_shape,
    register_method,
)
from .routing import RoutableConfig, compute_dtype, make_routing

log = logging.getLogger(__name__)


@register_method("null_lora")
@dataclasses.dataclass
class NullLoRAConfig(RoutableConfig):
    """Null-LoRA.

    Args:
        rtol: singular values ≤ rtol·σ_max count as zero; None: the storage-precision bound
            u·‖W0‖_F (module docstring).
        storage_dtype: the format W0 was stored in ("bfloat16", "float16", "float32") for that
            bound; None: the narrowest of them that holds W0 exactly.
        min_rank: None (default, the paper): rank = 2 × nullity; an even number fills layers up
            to that rank with near-null directions (their update leaves the null space by at most
            the report's ``null_leak``).
        max_rank: None (default, the paper): no cap; an even number caps a layer's rank.
        cache_dir: directory caching each layer's null-space bases, keyed by the weight's content
            (a second run skips the SVDs; :mod:`vlpeft.tensor_cache`); None: no cache.
        frozen_halves: "null_space" (the paper): B_f, A_f are null-space bases of W0; "random"
            (Tab. 3, "w/o null space"): seeded random orthonormal bases of the same sizes.
        random_seed: seed of the random frozen halves (each layer's draw also keys on its name).
        routing, separate_mapping, visual_dim: see :class:`~vlpeft.adapters.routing.RoutableConfig`.
    """

    rtol: float | None = None
    storage_dtype: str | None = None
    min_rank: int | None = None
    max_rank: int | None = None
    cache_dir: str | None = None
    frozen_halves: str = "null_space"
    random_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.frozen_halves in FROZEN_HALVES, "NullLoRAConfig.frozen_halves",
              f"one of {list(FROZEN_HALVES)}", self.frozen_halves)  # fmt: skip
        seed = self.random_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"NullLoRAConfig.random_seed must be an integer >= 0, got {seed!r}")
        for name in ("min_rank", "max_rank"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 2 or value % 2):
                raise ValueError(
                    f"NullLoRAConfig.{name} must be an even number >= 2 or None, got {value}"
                )
        if (
            self.min_rank is not None
            and self.max_rank is not None
            and self.max_rank < self.min_rank
        ):
            raise ValueError(
                f"NullLoRAConfig needs min_rank <= max_rank, got {self.min_rank} > {self.max_rank}"
            )
        if self.rtol is not None and not 0 <= self.rtol < 1:
            raise ValueError(f"NullLoRAConfig.rtol must be in [0, 1), got {self.rtol}")
        if self.storage_dtype is not None and self.storage_dtype not in ROUNDOFF:
            raise ValueError(
                f"NullLoRAConfig.storage_dtype must be one of {list(ROUNDOFF)} or None, "
                f"got {self.storage_dtype!r}"
            )

    def after_injection(self, adapters: dict[str, AdapterModule]) -> None:
        """Says the ranks self-adaptation chose; refuses a set in which no layer has a null space
        (nothing would train)."""
        ranks = {path: a.rank for path, a in adapters.items()}
        empty = [p for p, r in ranks.items() if r == 0]
        log.info(
            "null_lora: total rank %d over %d layers (%d without null space: not adapted)",
            sum(ranks.values()), len(ranks), len(empty),
        )  # fmt: skip
        if ranks and len(empty) == len(ranks):
            raise ValueError(
                f"null_lora: none of the {len(ranks)} target layers has a null space (e.g. "
                f"{empty[0]}), so nothing would train; set min_rank to fill layers with near-null "
                "directions (the report's null_leak says how far they leave the null space)"
            )

    def build(self, base_layer: nn.Module, layer_name: str) -> AdapterModule:
        if not (isinstance(base_layer, nn.Linear) or is_conv1d(base_layer)):
            raise TypeError(
                f"Null-LoRA target {layer_name!r} is a {type(base_layer).__name__}; it supports nn.Linear and Conv1D"
            )
        return NullLoRALinear(base_layer, self, layer_name)


FROZEN_HALVES = ("null_space", "random")  # what B_f, A_f are: the paper's, or Tab. 3's ablation


def base_matrix(base: nn.Module) -> torch.Tensor:
    """W0 as (d_out, d_in) whatever the storage layout."""
    return base.weight.T if is_conv1d(base) else base.weight


ROUNDOFF = {  # unit roundoff u of each storage format
    "bfloat16": 2.0**-8,
    "float16": 2.0**-11,
    "float32": 2.0**-24,
}


def storage_format(w: torch.Tensor) -> str:
    """The narrowest of bfloat16, float16, float32 that holds every entry of ``w`` exactly."""
    for name in ("bfloat16", "float16"):
        if torch.equal(w.to(getattr(torch, name)).to(w.dtype), w):
            return name
    return "float32"


GAP = 8.0  # the smallest ratio s_{k-1}/s_k that separates a null space from the spectrum


def zero_threshold(w: torch.Tensor, s: torch.Tensor, config: NullLoRAConfig) -> float:
    """Singular values ≤ this are zero: rtol·σ_max when given; otherwise the spectral gap below
    u(storage)·‖W0‖_F (Weyl's bound on what rounding W0 to its storage format can lift an exact
    zero to). The bound alone is loose (‖E‖₂ ≪ ‖E‖_F): a real singular value under it is not
    null, so among the values under it the cut is at the largest ratio between neighbours, and
    only when that ratio is at least ``GAP`` — the topmost such gap (no clear gap: no null
    space)."""
    if not s.numel():
        return 0.0
    if config.rtol is not None:
        return config.rtol * float(s.max())
    fmt = config.storage_dtype or storage_format(w)
    bound = ROUNDOFF[fmt] * float(s.square().sum().sqrt())
    under = int((s > bound).sum())  # s is descending: s[under:] are the candidates
    if under == len(s) or under == 0:
        return bound if under == 0 else -1.0
    ratios = s[under - 1 : -1] / s[under:].clamp_min(torch.finfo(s.dtype).tiny)
    gaps = (ratios >= GAP).nonzero()
    if not len(gaps):
        return -1.0  # a continuous tail: nothing is clearly null
    # the topmost clear gap, nearest the bound: the noise floor below it can hold larger ratios
    # between its own tiny values, which must not move the cut
    return float(s[under + int(gaps[0])])


def null_space(w: torch.Tensor, config: NullLoRAConfig) -> dict:
    """Null-space bases of W0 (d_out × d_in) and the nullity report.

    Returns:
        dict with ``left`` Û (d_out × h), ``right`` V̂ᵀ (h × d_in), ``left_nullity``,
        ``right_nullity``, ``half_rank`` h, ``singular_values`` (descending) and ``null_leak``
        (σ of the largest singular direction used / σ_max: 0 for an exact null space).
    """
    d_out, d_in = w.shape
    w64 = w.detach().to("cpu", torch.float64)
    u, s, vh = torch.linalg.svd(w64, full_matrices=False)  # thin: min(d_out, d_in) directions
    tol = zero_threshold(w.detach().cpu(), s, config)
    zero = int((s <= tol).sum()) if s.numel() and tol >= 0 else 0
    left_nullity, right_nullity = zero + max(0, d_out - d_in), zero + max(0, d_in - d_out)
    half = min(left_nullity, right_nullity)
    if config.min_rank is not None:
        half = max(half, config.min_rank // 2)
    if config.max_rank is not None:
        half = min(half, config.max_rank // 2)
    half = min(half, d_out, d_in)
    # ordered like the columns of a full SVD's U / rows of Vh read backwards: the structural null
    # directions of a non-square W0 first, then the singular directions, smallest value first
    left = smallest_directions(u, half)
    right = smallest_directions(vh.T, half).T
    return {
        "left": left.float().contiguous(),
        "right": right.float().contiguous(),
        "left_nullity": left_nullity,
        "right_nullity": right_nullity,
        "half_rank": half,
        "singular_values": s.float(),
        "null_leak": leak(s, d_out, d_in, half, tol),
    }


def leak(s: torch.Tensor, d_out: int, d_in: int, half: int, tol: float) -> float:
    """σ_k / σ_max for the largest singular value σ_k among the h *left* directions used (0 when
    all are null): the bound on |W0ᵀΔW| / (|W0|·|ΔW|). Every term of ΔW has Û (through P) on its
    left, so the right side does not enter W0ᵀΔW."""
    if half == 0 or not s.numel() or float(s.max()) == 0:
        return 0.0
    singular = half - max(0, d_out - d_in)  # left directions taken from the singular ones
    if singular <= 0:
        return 0.0
    value = float(s[-singular])
    return (value if value > tol else 0.0) / float(s.max())


def smallest_directions(basis: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` orthonormal columns: first the orthogonal complement of ``basis`` (n × k, orthonormal
    columns, k ≤ n), then ``basis``'s own columns from the last.

    The complement is what a full SVD adds to a thin one (the structural null space of a
    non-square matrix); any orthonormal basis of it is as good, so it is taken from a seeded
    Gaussian matrix projected off ``basis`` twice (re-orthogonalised) and QR-factorised. This
    avoids the n × n factor a ``full_matrices=True`` SVD computes, which dominates the cost of
    a 3072 × 768 FFN weight.
    """
    n, k = basis.shape
    extra = min(count, n - k)
    parts = []
    if extra > 0:
        g = torch.Generator().manual_seed(n * 1_000_003 + k)
        x = torch.randn(n, extra, generator=g, dtype=basis.dtype)
        for _ in range(2):
            x = x - basis @ (basis.T @ x)
        parts.append(torch.linalg.qr(x).Q)
    parts.append(basis.flip(1)[:, : count - extra])
    return torch.cat(parts, dim=1)


def cached_null_space(w: torch.Tensor, config: NullLoRAConfig) -> dict:
    """:func:`null_space`, read from / written to ``config.cache_dir`` when set (keyed by W0's
    content and the settings that change the result; :mod:`vlpeft.tensor_cache`)."""
    if config.cache_dir is None:
        return null_space(w, config)
    settings = [config.rtol, config.storage_dtype, config.min_rank, config.max_rank]
    key = content_key(w, [list(w.shape), *settings, 2])  # 2: the layout of the entries
    return cached(config.cache_dir, "nullspace", key, lambda: null_space(w, config))


def random_halves(ns: dict, w: torch.Tensor, seed: int, layer_name: str) -> dict:
    """Tab. 3's "w/o null space": ``ns`` (:func:`null_space` of ``w``) with ``left`` and ``right``
    replaced by random orthonormal bases of the same sizes — QR of a Gaussian drawn from ``seed``,
    ``layer_name`` and the shape, so every process and every run draws the same — and
    ``null_leak`` = ‖W0ᵀ·B_f‖₂ / ‖W0‖₂ (the update is B_f·M, so |W0ᵀΔW| ≤ leak·|W0|·|ΔW|)."""
    (d_out, d_in), h = w.shape, ns["half_rank"]
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{layer_name}:{d_out}x{d_in}".encode()))
    left = torch.linalg.qr(torch.randn(d_out, h, generator=g, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(d_in, h, generator=g, dtype=torch.float64)).Q.T
    top = float(ns["singular_values"].max()) if ns["singular_values"].numel() else 0.0
    w64 = w.detach().to("cpu", torch.float64)
    leak = float(torch.linalg.matrix_norm(w64.T @ left, ord=2)) / top if h and top else 0.0
    return {**ns, "left": left.float().contiguous(), "right": right.float().contiguous(),
            "null_leak": leak}  # fmt: skip


class NullLoRALinear(AdapterModule):
    """Null-LoRA on a Linear or Conv1D. Buffers ``null_left`` (B_f) and ``null_right`` (A_f) are
    frozen and saved with the adapter; ``lora_B``, ``lora_A`` and ``scale`` train."""

    mergeable = True
    lora_reducible = True

    def __init__(self, base: nn.Module, config: NullLoRAConfig, layer_name: str) -> None:
        super().__init__()
        d_in, d_out = linear_shape(base)
        with gathered([base.weight]):  # ZeRO-3: the SVD needs the whole weight
            ns = cached_null_space(base_matrix(base), config)
            if config.frozen_halves == "random":
                ns = random_halves(ns, base_matrix(base), config.random_seed, layer_name)
        h = ns["half_rank"]
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.register_buffer("null_left", ns["left"].to(**kw))
        self.register_buffer("null_right", ns["right"].to(**kw))
        factors = {
            "lora_B": torch.zeros(d_out, h, **kw),
            "lora_A": torch.zeros(h, d_in, **kw),
            "scale": torch.ones(2 * h, **kw),
        }
        for name, tensor in factors.items():
            if h:
                setattr(self, name, nn.Parameter(tensor))
            else:  # no null space: no update and nothing to train (ZeRO-3 refuses empty params)
                self.register_buffer(name, tensor)
        self.routing = make_routing(config, layer_name, d_in)
        self.lora_A_visual = None
        if self.routing is not None:
            self.mergeable = self.lora_reducible = False
            if self.routing.separate and h:
                visual = torch.zeros(2 * h, self.routing.visual_dim, **kw)
                nn.init.orthogonal_(visual[:h])
                self.lora_A_visual = nn.Parameter(visual)
        null = config.frozen_halves == "null_space"  # random halves: exact in neither space
        self.report = {
            "layer": layer_name,
            "shape": [d_out, d_in],
            "left_nullity": ns["left_nullity"],
            "right_nullity": ns["right_nullity"],
            "rank": 2 * h,
            "frozen_halves": config.frozen_halves,
            "left_exact": null and ns["left_nullity"] >= h,
            "right_exact": null and ns["right_nullity"] >= h,
            "null_leak": ns["null_leak"],
        }

    @property
    def rank(self) -> int:
        return 2 * self.lora_A.shape[0]

    def projected_b(self) -> torch.Tensor:
        """P·B = Û(ÛᵀB), never forming the d_out × d_out projector."""
        return self.null_left @ (self.null_left.T @ self.lora_B)

    def up_columns(self) -> torch.Tensor:
        """B_eq = [P·B, B_f] (d_out × 2h)."""
        return torch.cat([self.projected_b(), self.null_left], dim=1)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """z = [diag(s₁)·A_f·x, diag(s₂)·A·x] (..., 2h)."""
        return F.linear(x, torch.cat([self.null_right, self.lora_A], dim=0)) * self.scale

    def visual_bottleneck(self, x_r: torch.Tensor) -> torch.Tensor:
        """z_v: x_R through [A_f; A] (or the separate mapping), scaled by s."""
        if self.lora_A_visual is None:
            return self.bottleneck(x_r)
        return F.linear(x_r, self.lora_A_visual) * self.scale

    def forward(
        self, base_layer: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer
    ) -> torch.Tensor:
        if not self.lora_A.shape[0]:
            return y  # rank 0: the layer has no null space
        if self.routing is None and not layer.recording and not torch.compiler.is_compiling():
            dtype = compute_dtype(x, self.lora_A.dtype)
            if y.dtype == dtype and y.dim() >= 2 and x.shape[:-1] == y.shape[:-1]:
                return self.fused(x, y, dtype)
        z, b = self.bottleneck(x), self.up_columns()
        if self.routing is not None:
            z = self.routing(z, layer, self.visual_bottleneck)
        layer.record(self, z, b)
        return y + F.linear(z, b).to(y.dtype)

    def fused(self, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """y + (x·A_eqᵀ)·B_eqᵀ through :class:`_NullLoRAProduct` with this call's factors."""
        f = self.factors(dtype)
        rows = x.to(dtype).reshape(-1, x.shape[-1])
        out = _NullLoRAProduct.apply(
            rows, y.reshape(-1, y.shape[-1]), self.lora_A, self.lora_B, self.scale,
            f["a_cat"], f["a_eq"], f["b_eq"], self.null_left,
        )  # fmt: skip
        return out.view(y.shape)

    def factors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """A_eq = diag(s)·[A_f; A] and B_eq = [P·B, B_f] in ``dtype`` (and [A_f; A] in the
        parameters' dtype, for grad s), without autograd, built at every forward.

        Not cached across forwards: a write through ``.data`` or another view of a parameter —
        DeepSpeed ZeRO-1/2 keeps parameters as views of a flat buffer it updates, ``load_adapter``
        and the ZeRO-3 evaluation replica copy into ``.data`` — changes neither its address nor
        its version counter, so no cheap key can tell a stale cache from a fresh one."""
        with torch.no_grad():
            a_cat = torch.cat([self.null_right, self.lora_A])
            a_eq = (a_cat * self.scale[:, None]).to(dtype)
            b_eq = torch.cat([self.projected_b(), self.null_left], dim=1).to(dtype)
        return {"a_cat": a_cat, "a_eq": a_eq, "b_eq": b_eq}

    def lora_factors(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.cat([self.null_right, self.lora_A], dim=0) * self.scale[:, None]
        return a, self.up_columns()


class _NullLoRAProduct(torch.autograd.Function):
    """out = y + (x·A_eqᵀ)·B_eqᵀ for 2-D x (N, d_in) and y (N, d_out), with the gradients of the
    parameters A, B, s written out (A_eq, [A_f; A] and B_eq, built for this call, and Û are
    constants)."""

    @staticmethod
    def forward(ctx, x, y, lora_a, lora_b, scale, a_cat, a_eq, b_eq, left):
        z = x @ a_eq.T
        ctx.device = x.device.type
        ctx.save_for_backward(x, z, a_cat, a_eq, b_eq, left, scale)
        return torch.addmm(y, z, b_eq.T)

    @staticmethod
    def backward(ctx, g):
        x, z, a_cat, a_eq, b_eq, left, scale = ctx.saved_tensors
        h = left.shape[1]
        with torch.autocast(ctx.device, enabled=False):
            gz = g @ b_eq  # (N, 2h); its second half is g·Û
            grad_x = gz @ a_eq if ctx.needs_input_grad[0] else None
            grads = gz.T @ x  # dL/dA_eq (2h, d_in)
            if grads.dtype != a_cat.dtype:
                grads = grads.to(a_cat.dtype)
            grad_a = grads[h:] * scale[h:, None]
            grad_s = torch.bmm(grads.unsqueeze(1), a_cat.unsqueeze(2)).view(-1)
            # B enters only through P·B = Û(ÛᵀB): dL/dB = Û·Ûᵀ·gᵀ·z₁ = Û·((g·Û)ᵀ·z₁)
            grad_k = gz[:, h:].T @ z[:, :h]
            grad_b = left @ grad_k.to(left.dtype)
        return grad_x, g, grad_a, grad_b, grad_s, None, None, None, None
