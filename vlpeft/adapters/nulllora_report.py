"""The Null-LoRA rank report: per layer, the nullities of W0 and the rank self-adaptation chose.

Kept out of the method file: the plot needs matplotlib, imported only when a plot is written, so
importing vlpeft never loads it.

Example:
    >>> import torch, vlpeft
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> _ = vlpeft.add_adapter(net, vlpeft.NullLoRAConfig(targets=["0"], min_rank=2))
    >>> [row["rank"] for row in rank_report(net)]
    [2]
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .base import adapted_layers
from .nulllora import NullLoRALinear

__all__ = ["rank_report", "write_rank_report"]


def rank_report(module: nn.Module, name: str = "default") -> list[dict]:
    """Per-layer Null-LoRA report of adapter ``name``: layer, shape, nullities, chosen rank,
    ``frozen_halves`` (null-space or Tab. 3's random bases), exact null space or not
    (``left_exact``/``right_exact``: False for near-null fill and random halves) and ``null_leak``."""
    rows = []
    for _, layer in adapted_layers(module):
        adapter = layer.adapters[name] if name in layer.adapters else None
        if isinstance(adapter, NullLoRALinear):
            rows.append(dict(adapter.report))
    return rows


def write_rank_report(
    module: nn.Module, directory: str | os.PathLike, name: str = "default"
) -> list[dict]:
    """Writes ``null_lora_ranks.json`` and a PNG plot (rank and nullities per layer) to
    ``directory``; returns the rows of :func:`rank_report`."""
    rows = rank_report(module, name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "null_lora_ranks.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_ranks(rows, directory / "null_lora_ranks.png")
    return rows


def plot_ranks(rows: list[dict], path: str | os.PathLike) -> None:
    """Bars of the chosen rank per layer (green: exact null space, orange: near-null or random
    halves) and dots at twice the smaller nullity, saved as a PNG."""
    import matplotlib  # heavy and optional: only a plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar(
        xs,
        [r["rank"] for r in rows],
        color=["tab:green" if r["left_exact"] else "tab:orange" for r in rows],
        label="chosen rank (green: exact null space, orange: near-null or random halves)",
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
