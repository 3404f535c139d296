"""Adapter training step, memory and merged inference against peft and the base model.

``python -m bench.adapters [--device cuda] [--dtype bf16] [--quick]`` builds BART-base-size and
BLIP-base-size models (random weights, transformers classes, same layers for every method) and
measures, each as a ratio to an anchor timed in the same run:

- training step (forward, backward, AdamW step) of vlpeft LoRA, Null-LoRA, FLoRA-linear and
  routed LoRA (proj) / peft LoRA at the same rank on the same layers;
- ReSoRA: the step with the penalty of each kind / the same step without it;
- training memory of Null-LoRA / LoRA: on a GPU the true peak; on the CPU the bytes autograd saves
  for backward plus the trainable tensors, their gradients and AdamW's two moments;
- inference of the merged LoRA model / the base model.

Writes ``bench/results/adapters_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

import vlpeft
from bench.common import machine, paired, verdict, write
from vlpeft.adapters import FLoRAConfig, LoRAConfig, NullLoRAConfig, ReSoRAConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RANK = 8
TARGETS = {"bart-base": ["q_proj", "v_proj"], "blip-base": ["qkv", "query", "value"]}


def bart_base():
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
        encoder_attention_heads=12, decoder_attention_heads=12,
        encoder_ffn_dim=3072, decoder_ffn_dim=3072, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    return BartForConditionalGeneration(config)


def blip_base(image_size: int):
    from transformers import BlipConfig, BlipForImageTextRetrieval

    # BlipVisionConfig initialises with std 1e-10 (it expects loaded weights); 0.02 like the text
    config = BlipConfig(vision_config={"image_size": image_size, "initializer_range": 0.02})
    return BlipForImageTextRetrieval(config)


def inputs(name: str, batch: int, device: str, image_size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    if name == "bart-base":
        return {
            "input_ids": torch.randint(4, 50000, (batch, 64), generator=g).to(device),
            "labels": torch.randint(4, 50000, (batch, 24), generator=g).to(device),
        }
    return {
        "input_ids": torch.randint(1000, 30000, (batch, 32), generator=g).to(device),
        "pixel_values": torch.randn(batch, 3, image_size, image_size, generator=g).to(device),
    }


def loss_of(name: str, model, batch: dict) -> torch.Tensor:
    out = model(**batch)
    return out.loss if name == "bart-base" else out.itm_score.float().logsumexp(-1).mean()


def with_method(base, name: str, method: str):
    """A copy of ``base`` with ``method`` on the benchmark's target layers (None: no adapter)."""
    model = copy.deepcopy(base)
    targets = TARGETS[name]
    if method == "peft-lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(
            model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets)
        )
    configs = {
        "lora": LoRAConfig(targets=targets, r=RANK, alpha=2 * RANK),
        "routed-lora": LoRAConfig(targets=targets, r=RANK, alpha=2 * RANK, routing="proj"),
        "null-lora": NullLoRAConfig(targets=targets, min_rank=RANK, max_rank=RANK),
        "flora": FLoRAConfig(targets=targets, r=RANK),
    }
    if method is not None:
        vlpeft.add_adapter(model, configs[method])
    else:
        model.requires_grad_(False)
    return model


class Step:
    """One training step of ``model``: forward (inside x_R when routed), loss (+ ReSoRA), backward,
    AdamW step, zero_grad."""

    def __init__(self, name, model, batch, dtype, resora: ReSoRAConfig | None = None):
        self.name, self.model, self.batch, self.resora = name, model, batch, resora
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        self.dtype = dtype
        self.device = next(model.parameters()).device
        width = 768
        rows = next(iter(batch.values())).shape[0]
        self.x_r = torch.randn(rows, width, device=self.device)
        if resora:
            vlpeft.enable_resora(model)

    def __call__(self) -> None:
        with (
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bf16"),
            vlpeft.routing_inputs(self.model, self.x_r),
        ):
            loss = loss_of(self.name, self.model, self.batch)
            if self.resora:
                loss = loss + vlpeft.resora_penalty(self.model, self.resora)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def training_bytes(step: Step) -> int:
    """Peak bytes on a GPU; on the CPU the bytes saved for backward + trainable state (×4)."""
    if step.device.type == "cuda":
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    trainable = sum(
        p.numel() * p.element_size() for p in step.model.parameters() if p.requires_grad
    )
    return saved + 4 * trainable


def run(args) -> dict:
    device, dtype = args.device, args.dtype
    repeats, warmup = (3, 1) if args.quick else (args.repeats, 2)
    torch.manual_seed(0)
    models = {"bart-base": bart_base(), "blip-base": blip_base(args.image_size)}
    rows = []
    for name, base in models.items():
        base = base.to(device)
        batch = inputs(name, args.batch, device, args.image_size)
        row = {"model": name, "batch": args.batch}
        steps = {}
        for method in ("peft-lora", "lora", "null-lora", "flora", "routed-lora"):
            steps[method] = Step(name, with_method(base, name, method).train(), batch, dtype)
        for method in ("lora", "null-lora", "flora", "routed-lora"):
            ratio, seconds, anchor = paired(
                steps[method], steps["peft-lora"], device, repeats, warmup
            )
            row[f"ratio_{method}"], row[f"step_{method}"] = ratio, seconds
            row["step_peft-lora"] = anchor
        for kind in ("linear", "cosine", "euclidean", "kernel"):
            model = with_method(base, name, "lora").train()
            step = Step(name, model, batch, dtype, ReSoRAConfig(kind=kind, weight=0.1))
            ratio, _, _ = paired(step, steps["lora"], device, repeats, warmup)
            row[f"resora_{kind}_added"] = ratio - 1
        row["memory_lora"] = training_bytes(steps["lora"])
        row["memory_null-lora"] = training_bytes(steps["null-lora"])
        row["memory_ratio"] = row["memory_null-lora"] / row["memory_lora"]
        steps.clear()
        plain = with_method(base, name, None).eval()
        merged = with_method(base, name, "lora").eval()
        for p in merged.parameters():  # a trained-looking update, not B = 0
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.01)
        vlpeft.merge_adapter(merged)

        def infer(m, name=name, batch=batch):
            def fn():
                with (
                    torch.no_grad(),
                    torch.autocast(
                        torch.device(device).type, torch.bfloat16, enabled=dtype == "bf16"
                    ),
                ):
                    loss_of(name, m, batch)

            return fn

        ratio, row["infer_merged"], row["infer_base"] = paired(
            infer(merged), infer(plain), device, repeats, warmup
        )
        row["merged_ratio"] = ratio
        rows.append(row)
        models[name] = None
    return {
        "machine": machine(device),
        "dtype": dtype,
        "rank": RANK,
        "repeats": repeats,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    m = result["machine"]
    where = m.get("gpu", f"{m['cores']}-core CPU ({m['threads']} threads)")
    lines = [
        f"# Adapter step, memory and merged inference ({where}, {result['dtype']})",
        "",
        f"Rank {result['rank']}, median ratios of {result['repeats']} alternating pairs after warm-up; "
        "random weights; targets: BART q_proj, v_proj; BLIP vision qkv, text query, value.",
        "",
        "| figure | target | " + " | ".join(r["model"] for r in result["rows"]) + " | verdict |",
        "|---|---|" + "---|" * len(result["rows"]) + "---|",
    ]

    def line(label, key, target, fmt="{:.3f}", limit=None):
        values = [r[key] for r in result["rows"]]
        bound = limit if limit is not None else float(target.strip("≤ %"))
        cells = " | ".join(fmt.format(v) for v in values)
        lines.append(f"| {label} | {target} | {cells} | {verdict(max(values), bound)} |")

    line("vlpeft LoRA step / peft LoRA", "ratio_lora", "≤ 1.00")
    line("Null-LoRA step / peft LoRA", "ratio_null-lora", "≤ 1.10")
    line("FLoRA-linear step / peft LoRA", "ratio_flora", "≤ 1.10")
    line("routed LoRA (proj) step / peft LoRA", "ratio_routed-lora", "≤ 1.10")
    for kind in ("linear", "cosine", "euclidean", "kernel"):
        line(f"ReSoRA {kind}: added step time", f"resora_{kind}_added", "≤ 5 %", "{:+.1%}", 0.05)
    line("Null-LoRA training memory / LoRA", "memory_ratio", "≤ 1.10")
    line("merged LoRA inference / base model", "merged_ratio", "≤ 1.02")
    lines += ["", "Seconds per step: " + "; ".join(
        f"{r['model']}: peft {r['step_peft-lora']:.3f}, vlpeft {r['step_lora']:.3f}, "
        f"base inference {r['infer_base']:.3f}" for r in result["rows"]), ""]  # fmt: skip
    if m["device"] == "cpu":
        lines.append("CPU memory = bytes autograd saves for backward + 4 × trainable bytes.\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 repetitions (a smoke run)")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.batch = args.batch or (16 if gpu else 2)
    args.image_size = args.image_size or (384 if gpu else 224)
    result = run(args)
    result["image_size"] = args.image_size
    write(f"adapters_{'gpu' if gpu else 'cpu'}", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
