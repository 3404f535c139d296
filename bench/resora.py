"""ReSoRA penalty: closed form (r×r Gram matrices) against the naive definition (every Δh_i built).

``python -m bench.resora [--quick]`` writes ``bench/results/resora.json`` and ``resora.md``: median
time (forward + backward) and peak extra memory of each kind, fast vs naive, over several sizes.
The naive definitions here are also the references the tests compare against.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vlpeft.adapters.resora import KINDS, subsample, subspace_penalty

RESULTS = Path(__file__).parent / "results"


def naive_penalty(
    z, b, kind, beta=1.0, sigma_frac=0.5, max_samples=512, seed=0, shared_sigma=False
):
    """The paper's Eq. 5-8 written literally over Δh_i^n = b_i z_ni (r × N × d_out materialised)."""
    r = z.shape[1]
    pairs = [(i, j) for i in range(r) for j in range(i + 1, r)]
    if kind == "kernel":
        z = subsample(z, max_samples, seed)
    dh = z.T[:, :, None] * b.T[:, None, :]
    n = z.shape[0]
    total = z.new_zeros(())
    if kind == "euclidean":
        for i, j in pairs:
            total = total + torch.exp(-beta * (dh[i] - dh[j]).square().sum(-1)).mean()
    elif kind == "cosine":
        for i, j in pairs:
            cos = (
                F.normalize(dh[i], dim=-1, eps=1e-12) * F.normalize(dh[j], dim=-1, eps=1e-12)
            ).sum(-1)
            total = total + cos.mean()
    elif kind == "linear":
        big = [h.T for h in dh]  # ΔH_i ∈ R^{d×N}
        for i, j in pairs:
            num = (big[i] @ big[j].T).square().sum()
            den = torch.linalg.matrix_norm(big[i] @ big[i].T) * torch.linalg.matrix_norm(
                big[j] @ big[j].T
            )
            total = total + num / den
    else:
        m = torch.eye(n, dtype=z.dtype) - torch.ones(n, n, dtype=z.dtype) / n
        iu = torch.triu_indices(n, n, 1)
        ks = []
        dists = [torch.cdist(dh[i], dh[i]) for i in range(r)]
        shared = torch.cat([d[iu[0], iu[1]] for d in dists]).detach().median()
        for d in dists:
            sigma = sigma_frac * (shared if shared_sigma else d[iu[0], iu[1]].detach().median())
            ks.append(torch.exp(-d.square() / (2 * sigma**2)))
        for i, j in pairs:
            num = torch.trace(ks[i] @ m @ ks[j] @ m)
            den = torch.sqrt(
                torch.trace(ks[i] @ m @ ks[i] @ m) * torch.trace(ks[j] @ m @ ks[j] @ m)
            )
            total = total + num / den
    return total


def measure(fn, z, b, kind, repeats):
    """Median seconds of forward + backward after one warm-up."""
    times = []
    for k in range(repeats + 1):
        zz, bb = z.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        start = time.perf_counter()
        fn(zz, bb, kind).backward()
        if k:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_tensor_bytes(fn, z, b, kind):
    """Bytes of autograd-saved tensors: a proxy for the activation memory a penalty adds."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    zz, bb = z.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(zz, bb, kind)
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    args = parser.parse_args(argv)
    sizes = [(256, 8, 256)] if args.quick else [(256, 8, 768), (1024, 8, 768), (1024, 16, 768)]
    repeats = 2 if args.quick else 5
    rows = []
    for n, r, d in sizes:
        g = torch.Generator().manual_seed(0)
        z, b = torch.randn(n, r, generator=g), torch.randn(d, r, generator=g) * 0.1
        for kind in KINDS:
            t_fast = measure(subspace_penalty, z, b, kind, repeats)
            t_naive = measure(naive_penalty, z, b, kind, max(1, repeats // 2))
            m_fast = peak_tensor_bytes(subspace_penalty, z, b, kind)
            m_naive = peak_tensor_bytes(naive_penalty, z, b, kind)
            rows.append(
                {
                    "N": n,
                    "r": r,
                    "d_out": d,
                    "kind": kind,
                    "fast_ms": round(t_fast * 1e3, 3),
                    "naive_ms": round(t_naive * 1e3, 3),
                    "speedup": round(t_naive / t_fast, 1),
                    "fast_saved_MB": round(m_fast / 2**20, 3),
                    "naive_saved_MB": round(m_naive / 2**20, 3),
                }
            )
            print(rows[-1])
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    (RESULTS / "resora.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    header = "| N | r | d_out | kind | fast ms | naive ms | speed-up | fast saved MB | naive saved MB |\n|---|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {x['N']} | {x['r']} | {x['d_out']} | {x['kind']} | {x['fast_ms']} | {x['naive_ms']} | {x['speedup']}× | {x['fast_saved_MB']} | {x['naive_saved_MB']} |\n"
        for x in rows
    )
    (RESULTS / "resora.md").write_text(f"# ReSoRA fast vs naive ({meta})\n\n" + header + body)
    return rows


if __name__ == "__main__":
    main()
