"""Null-LoRA (Zhang et al., 2025): low-rank adaptation in the null space of the pre-trained weight.

For W0 (d_out × d_in) with SVD U Σ Vᵀ, Û (d_out × h) spans the left null space (W0ᵀ Û = 0) and
V̂ᵀ (h × d_in) the right one (W0 V̂ = 0). With frozen B_f = Û, A_f = V̂ᵀ and trainable B (d_out × h),
A (h × d_in) zero-initialised and s ∈ R^{2h} (ones), Eq. (3) and (10) give

    ΔW = P·B·diag(s₁)·A_f + B_f·diag(s₂)·A,      P = Û Ûᵀ,

so W0ᵀ ΔW = 0 (Eq. 7): the update never touches the output directions W0 already uses. P is never
formed: P·B = Û(ÛᵀB). The forward never builds ΔW either; it is the rank-2h LoRA with
A_eq = [diag(s₁)A_f; diag(s₂)A] and B_eq = [P·B, B_f].

Rank self-adaptation (Sec. 3.2): the layer's rank r = 2h with h = min(left nullity, right nullity),
clipped into [min_rank/2, max_rank/2]. A nullity counts singular values ≤ rtol·σ_max plus the
structural null directions of a non-square W0 on that side. When fewer exact null directions exist
than h, the directions of the smallest singular values are used ("near-null"), and the rank report
says so per side.

Default ``rtol`` (None): max(d_out, d_in)·ε(float32), the numerical-rank threshold of
``numpy.linalg.matrix_rank``/``torch.linalg.matrix_rank``: a singular value below it is zero to the
precision the weights are stored in, so "exact" in the report means W0ᵀΔW = 0 to float tolerance.
Raise it (e.g. 1e-3) to count the nearly-inactive directions of real checkpoints as null space.

With ``routing`` (Qu et al. 2024, composed as for every bottleneck method) the 2h-wide bottleneck z
is routed with the same map of x_R, z_v = [diag(s₁)·A_f·x_R, diag(s₂)·A·x_R] (or a separate
trainable map ``lora_A_visual``, initialised like [A_f; A]: orthonormal-random rows then zeros, so
the routed branch starts at zero too); the branch is B_eq·route(z, z_v). A routed Null-LoRA depends
on the input, so it is neither mergeable nor exported to peft.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    AdaptedLayer,
    AdapterModule,
    adapted_layers,
    gathered,
    is_conv1d,
    linear_shape,
    register_method,
)
from .routing import RoutableConfig, make_routing


@register_method("null_lora")
@dataclasses.dataclass
class NullLoRAConfig(RoutableConfig):
    """Null-LoRA.

    Args:
        rtol: singular values ≤ rtol·σ_max count as zero; None: max(d_out, d_in)·ε(float32).
        min_rank: smallest rank (even) of a layer; near-null directions fill up to it.
        max_rank: largest rank (even) of a layer.
        cache_dir: directory caching each layer's null-space bases, keyed by the weight's content
            (a second run skips the SVDs); None: no cache.
        routing, separate_mapping, visual_dim: see :class:`~vlpeft.adapters.routing.RoutableConfig`.
    """

    rtol: float | None = None
    min_rank: int = 8
    max_rank: int = 64
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            self.min_rank < 2
            or self.min_rank % 2
            or self.max_rank % 2
            or self.max_rank < self.min_rank
        ):
            raise ValueError(
                f"NullLoRAConfig needs even 2 <= min_rank <= max_rank, got min_rank={self.min_rank}, max_rank={self.max_rank}"
            )
        if self.rtol is not None and not 0 <= self.rtol < 1:
            raise ValueError(f"NullLoRAConfig.rtol must be in [0, 1), got {self.rtol}")

    def build(self, base_layer: nn.Module, layer_name: str) -> AdapterModule:
        if not (isinstance(base_layer, nn.Linear) or is_conv1d(base_layer)):
            raise TypeError(
                f"Null-LoRA target {layer_name!r} is a {type(base_layer).__name__}; it supports nn.Linear and Conv1D"
            )
        return NullLoRALinear(base_layer, self, layer_name)


def base_matrix(base: nn.Module) -> torch.Tensor:
    """W0 as (d_out, d_in) whatever the storage layout."""
    return base.weight.T if is_conv1d(base) else base.weight


def null_space(w: torch.Tensor, config: NullLoRAConfig) -> dict:
    """Null-space bases of W0 (d_out × d_in) and the nullity report.

    Returns:
        dict with ``left`` Û (d_out × h), ``right`` V̂ᵀ (h × d_in), ``left_nullity``,
        ``right_nullity``, ``half_rank`` h and ``singular_values`` (descending).
    """
    d_out, d_in = w.shape
    w = w.detach().to("cpu", torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # thin: min(d_out, d_in) directions
    rtol = (
        config.rtol
        if config.rtol is not None
        else max(d_out, d_in) * torch.finfo(torch.float32).eps
    )
    zero = int((s <= rtol * s.max()).sum()) if s.numel() else 0
    left_nullity, right_nullity = zero + max(0, d_out - d_in), zero + max(0, d_in - d_out)
    half = min(
        max(min(left_nullity, right_nullity), config.min_rank // 2),
        config.max_rank // 2,
        d_out,
        d_in,
    )
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
    }


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


def _cache_key(w: torch.Tensor, config: NullLoRAConfig) -> str:
    digest = hashlib.sha256(w.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    digest.update(
        json.dumps([list(w.shape), config.rtol, config.min_rank, config.max_rank]).encode()
    )
    return digest.hexdigest()[:32]


def cached_null_space(w: torch.Tensor, config: NullLoRAConfig) -> dict:
    """:func:`null_space`, read from / written to ``config.cache_dir`` when set."""
    if config.cache_dir is None:
        return null_space(w, config)
    from safetensors.torch import load_file, save_file

    path = Path(config.cache_dir) / f"nullspace-{_cache_key(w, config)}.safetensors"
    ints = ("left_nullity", "right_nullity", "half_rank")
    if path.is_file():
        data = load_file(str(path))
        return {k: (int(v) if k in ints else v) for k, v in data.items()}
    result = null_space(w, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: (torch.tensor(v) if k in ints else v) for k, v in result.items()}, str(tmp))
    os.replace(tmp, path)
    return result


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
        h = ns["half_rank"]
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.register_buffer("null_left", ns["left"].to(**kw))
        self.register_buffer("null_right", ns["right"].to(**kw))
        self.lora_B = nn.Parameter(torch.zeros(d_out, h, **kw))
        self.lora_A = nn.Parameter(torch.zeros(h, d_in, **kw))
        self.scale = nn.Parameter(torch.ones(2 * h, **kw))
        self.transposed = is_conv1d(base)
        self.routing = make_routing(config, layer_name, d_in)
        self.lora_A_visual = None
        if self.routing is not None:
            self.mergeable = self.lora_reducible = False
            if self.routing.separate:
                visual = torch.zeros(2 * h, self.routing.visual_dim, **kw)
                nn.init.orthogonal_(visual[:h])
                self.lora_A_visual = nn.Parameter(visual)
        self.report = {
            "layer": layer_name,
            "shape": [d_out, d_in],
            "left_nullity": ns["left_nullity"],
            "right_nullity": ns["right_nullity"],
            "rank": 2 * h,
            "left_exact": ns["left_nullity"] >= h,
            "right_exact": ns["right_nullity"] >= h,
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
        z, b = self.bottleneck(x), self.up_columns()
        if self.routing is not None:
            z = self.routing(z, layer, self.visual_bottleneck)
        layer.record(self, z, b)
        return y + F.linear(z, b).to(y.dtype)

    def lora_factors(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.cat([self.null_right, self.lora_A], dim=0) * self.scale[:, None]
        return a, self.up_columns()

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        if self.routing is not None:
            return super().delta_weight(base_layer)
        a, b = self.lora_factors(base_layer)
        delta = b @ a
        return delta.T if self.transposed else delta


def rank_report(module: nn.Module, name: str = "default") -> list[dict]:
    """Per-layer Null-LoRA report: layer, shape, nullities, chosen rank, exact or near-null."""
    rows = []
    for _, layer in adapted_layers(module):
        adapter = layer.adapters[name] if name in layer.adapters else None
        if isinstance(adapter, NullLoRALinear):
            rows.append(dict(adapter.report))
    return rows


def write_rank_report(
    module: nn.Module, directory: str | os.PathLike, name: str = "default"
) -> list[dict]:
    """Writes ``null_lora_ranks.json`` and a PNG plot (rank and nullities per layer) to ``directory``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rank_report(module, name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "null_lora_ranks.json").write_text(json.dumps(rows, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar(
        xs,
        [r["rank"] for r in rows],
        color=["tab:green" if r["left_exact"] else "tab:orange" for r in rows],
        label="chosen rank (green: exact null space, orange: near-null)",
    )
    ax.plot(
        xs,
        [min(r["left_nullity"], r["right_nullity"]) * 2 for r in rows],
        "k.",
        label="2 × min nullity",
    )
    ax.set_xticks(list(xs), [r["layer"] for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("rank")
    ax.set_title("Null-LoRA rank per layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(directory / "null_lora_ranks.png", dpi=120)
    plt.close(fig)
    return rows
