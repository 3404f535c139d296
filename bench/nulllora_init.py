"""Null-LoRA initialisation time on BLIP-base: the SVD of every target layer, first and cached.

``python -m bench.nulllora_init`` injects Null-LoRA into all attention and FFN linear layers of
the vision and text encoders of a BLIP-base-size model (random weights; the SVD's cost depends on
the shapes only), once with an empty cache directory and once more reading it. Writes
``bench/results/nulllora_init.json`` and ``.md``. Target: ≤ 60 s first on 2 cores, ≈ 0 cached.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

import vlpeft
from bench.adapters import blip_base
from bench.common import machine, report, write
from vlpeft.adapters import NullLoRAConfig

TARGETS = r".*(encoder|vision_model)\..*\.(qkv|projection|fc1|fc2|query|key|value|dense)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    base = blip_base(224)
    layers = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    with tempfile.TemporaryDirectory() as cache:
        config = NullLoRAConfig(
            targets=TARGETS, min_rank=args.rank, max_rank=args.rank, cache_dir=cache
        )
        times = []
        for _ in range(2):
            model = copy.deepcopy(base)
            start = time.perf_counter()
            vlpeft.add_adapter(model, config)
            times.append(time.perf_counter() - start)
        adapted = len(list(vlpeft.adapted_layers(model)))
    result = {
        "machine": machine("cpu"),
        "layers": adapted,
        "linear_layers": len(layers),
        "first_s": times[0],
        "cached_s": times[1],
    }
    m = result["machine"]
    markdown = report(
        f"Null-LoRA initialisation, BLIP-base size ({m['cores']}-core CPU, {m['threads']} threads)",
        f"{adapted} target layers (every attention and FFN linear of the vision and text encoders),"
        f" rank {args.rank}; float64 SVD of each weight.",
        [("first initialisation (SVDs)", "≤ 60 s", f"{times[0]:.1f} s", times[0], 60),
         ("cached (second run)", "≈ 0 s", f"{times[1]:.2f} s", times[1], 2.0)],
    )  # fmt: skip
    write("nulllora_init", result, markdown)
    return result


if __name__ == "__main__":
    main()
