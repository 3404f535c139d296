"""Adapter training step, memory and merged inference against peft and the base model.

``python -m bench.adapters [--device cuda] [--dtype bf16] [--quick | --gpu-quick]
[--compile METHOD:MODE ...]`` builds BART-base-size and BLIP-base-size models (random weights,
transformers classes, same layers for every method) and measures, each as a ratio to an anchor
timed in the same run (alternating pairs, after warm-up):

- training step (forward, backward, AdamW step) of vlpeft LoRA, Null-LoRA, FLoRA-linear and
  routed LoRA (proj) / peft LoRA at the same rank on the same layers; each pair's own anchor
  seconds are kept (the "Seconds per step" line names the pair);
- compiled variants (``vlpeft.compile.compile_model``, inductor): the compiled step / the same
  method's eager step, for the ``METHOD:MODE`` pairs asked for (``--compile``; ``--gpu-quick``
  takes the methods whose eager figure missed in the last GPU run);
- ReSoRA: the step with the penalty of each kind / the same step without it (kernel kind at
  ``max_samples`` 256, the issue's setting);
- training memory of each method / peft LoRA: on a GPU the true peak; on the CPU the bytes
  autograd saves for backward plus the trainable tensors, their gradients and AdamW's two moments;
- inference of the merged LoRA model / the base model.

Writes ``bench/results/adapters_<device>.json`` and ``.md`` (rewritten after each model, so a run
cut short keeps what it measured). ``bench/gpu_adapters.sh`` is the one-command GPU table.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch

import vlpeft
from bench.common import machine, paired, sync, verdict, write
from vlpeft.adapters import FLoRAConfig, LoRAConfig, NullLoRAConfig, ReSoRAConfig
from vlpeft.adapters.routing import route
from vlpeft.compile import compile_model

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


def with_method(base, name: str, method: str, cache_dir: str | None = None):
    """A copy of ``base`` with ``method`` on the benchmark's target layers (None: no adapter);
    ``cache_dir``: Null-LoRA's null-space cache (the copies of one base share their SVDs)."""
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
        "null-lora": NullLoRAConfig(
            targets=targets, min_rank=RANK, max_rank=RANK, cache_dir=cache_dir
        ),
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
        routings = [a.routing for _, layer in vlpeft.adapted_layers(model)
                    for a in layer.adapters.values() if a.routing is not None]  # fmt: skip
        width = routings[0].visual_dim if routings else 768
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


METHODS = ("lora", "null-lora", "flora", "routed-lora")
KINDS = ("linear", "cosine", "euclidean", "kernel")
KERNEL_SAMPLES = 256  # the setting for the kernel kind's target
# the methods whose eager GPU step missed its target in the last GPU run (BENCHMARKS.md); the
# whole-model compilation only on BART-base (BLIP-base's takes minutes of the GPU budget)
GPU_QUICK_COMPILE = {
    "bart-base": ("null-lora:adapters", "routed-lora:adapters", "null-lora:model"),
    "blip-base": ("null-lora:adapters",),
}


def preflight(device: str) -> dict:
    """On the benchmark's device, in bf16 autocast: the fused Null-LoRA and routed LoRA paths
    against their composed formulas (outputs and gradients), before any time is spent timing.
    Returns the largest relative differences; raises when one is above 3e-2."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 80).to(device)
    with torch.no_grad():
        lin.weight[:, :8] = 0  # a null space for Null-LoRA
    x = torch.randn(4, 12, 96, device=device)
    x_r = torch.randn(4, 96, device=device)
    found = {}
    for method, config in (
        ("null-lora", NullLoRAConfig(targets=["0"], min_rank=8)),
        ("routed-lora", LoRAConfig(targets=["0"], r=8, alpha=16, routing="proj")),
    ):
        net = torch.nn.Sequential(copy.deepcopy(lin))
        vlpeft.add_adapter(net, config)
        ad = net[0].adapters["default"]
        with torch.no_grad():
            for p in ad.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        params = [p for p in ad.parameters() if p.requires_grad]
        outs = []
        for fused in (True, False):
            xx = x.clone().requires_grad_()
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                if fused:
                    with vlpeft.routing_inputs(net, x_r):
                        y = net(xx)
                elif method == "null-lora":
                    y = net[0].base_layer(xx) + torch.nn.functional.linear(
                        ad.bottleneck(xx), ad.up_columns()
                    ).to(torch.bfloat16)
                else:
                    z = route("proj", xx @ ad.lora_A.T, x_r @ ad.lora_A.T)
                    y = net[0].base_layer(xx) + (ad.scaling * z @ ad.lora_B.T).to(torch.bfloat16)
            outs.append((y, torch.autograd.grad(y.float().square().sum(), [xx, *params])))
        (y_f, g_f), (y_c, g_c) = ((y.detach(), g) for y, g in outs)
        rel = [float((y_f.float() - y_c.float()).norm() / y_c.float().norm())]
        rel += [float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(g_f, g_c)]
        found[method] = max(rel)
        if found[method] > 3e-2:
            raise RuntimeError(f"preflight: {method}'s fused path differs by {found[method]:.3g}")
    log(f"preflight on {device}: fused == composed (largest relative difference {found})")
    return found


def resora_config(kind: str) -> ReSoRAConfig:
    return ReSoRAConfig(kind=kind, weight=0.1, max_samples=KERNEL_SAMPLES)


def log(message: str) -> None:
    print(f"[bench.adapters {time.strftime('%H:%M:%S')}] {message}", flush=True)


def measure_model(name: str, base, args, timing: tuple[int, int]) -> dict:
    """Every figure of one model size (see the module docstring)."""
    device, dtype = args.device, args.dtype
    repeats, warmup = timing
    base = base.to(device)
    batch = inputs(name, args.batch, device, args.image_size)
    row = {"model": name, "batch": args.batch}
    steps = {m: Step(name, with_method(base, name, m, args.svd_cache).train(), batch, dtype)
             for m in ("peft-lora", *METHODS)}  # fmt: skip
    for method in METHODS:
        ratio, seconds, anchor = paired(steps[method], steps["peft-lora"], device, repeats, warmup)
        row[f"ratio_{method}"], row[f"step_{method}"] = ratio, seconds
        row[f"anchor_{method}"] = anchor  # peft LoRA's seconds in this pair
        log(f"{name} {method}: {ratio:.3f} × peft ({seconds:.4f} s / {anchor:.4f} s)")
    for kind in KINDS:
        model = with_method(base, name, "lora").train()
        step = Step(name, model, batch, dtype, resora_config(kind))
        ratio, seconds, anchor = paired(step, steps["lora"], device, repeats, warmup)
        row[f"resora_{kind}_added"] = ratio - 1
        row[f"resora_{kind}_added_ms"] = (seconds - anchor) * 1e3
        log(f"{name} ReSoRA {kind}: {ratio - 1:+.1%}")
    for method in ("peft-lora", *METHODS):
        row[f"memory_{method}"] = training_bytes(steps[method])
    for method in METHODS:
        row[f"memory_ratio_{method}"] = row[f"memory_{method}"] / row["memory_peft-lora"]
    row["memory_ratio"] = row["memory_null-lora"] / row["memory_lora"]
    steps.clear()
    plain = with_method(base, name, None).eval()
    merged = with_method(base, name, "lora").eval()
    for p in merged.parameters():  # a trained-looking update, not B = 0
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.01)
    vlpeft.merge_adapter(merged)

    def infer(m):
        def fn():
            with (
                torch.no_grad(),
                torch.autocast(torch.device(device).type, torch.bfloat16, enabled=dtype == "bf16"),
            ):
                loss_of(name, m, batch)

        return fn

    ratio, row["infer_merged"], row["infer_base"] = paired(
        infer(merged), infer(plain), device, repeats, warmup
    )
    row["merged_ratio"] = ratio
    return row


def measure_compiled(name: str, base, args, timing: tuple[int, int], row: dict) -> None:
    """The compiled variants asked for ``name``: compiled step / the same method's eager step
    (a fresh eager anchor), and the compilation's own seconds (the first step, timed apart)."""
    device, dtype = args.device, args.dtype
    repeats, warmup = timing
    batch = inputs(name, args.batch, device, args.image_size)
    variants = args.compile.get(name, ()) if isinstance(args.compile, dict) else args.compile
    for variant in variants:
        method, mode = variant.split(":")
        eager = Step(name, with_method(base, name, method, args.svd_cache).train(), batch, dtype)
        model = compile_model(
            with_method(base, name, method, args.svd_cache).train(),
            mode=mode,
            backend=args.compile_backend,
        )
        compiled = Step(name, model, batch, dtype)
        start = time.perf_counter()
        compiled()  # the compilation itself
        sync(device)
        row[f"compile_seconds_{variant}"] = time.perf_counter() - start
        ratio, seconds, anchor = paired(compiled, eager, device, repeats, warmup)
        row[f"compiled_{variant}"], row[f"step_compiled_{variant}"] = ratio, seconds
        row[f"compiled_vs_peft_{variant}"] = ratio * row[f"ratio_{method}"]
        log(f"{name} {variant} compiled: {ratio:.3f} × eager ({seconds:.4f} s / {anchor:.4f} s)")
        del compiled, model, eager


def run(args) -> dict:
    timing = (3, 1) if args.quick else (args.repeats, args.warmup)
    torch.manual_seed(0)
    result = {
        "machine": machine(args.device),
        "dtype": args.dtype,
        "rank": RANK,
        "repeats": timing[0],
        "image_size": args.image_size,
        "compile": sorted({v for vs in _compile_lists(args.compile) for v in vs}),
        "compile_backend": args.compile_backend,
        "kernel_max_samples": KERNEL_SAMPLES,
        "rows": [],
    }
    if args.device.startswith("cuda"):
        result["preflight"] = preflight(args.device)
        limits = [
            k for k in ("recompile_limit", "cache_size_limit") if hasattr(torch._dynamo.config, k)
        ]
        for key in limits:  # one adapter code object serves every layer shape and sequence length
            setattr(torch._dynamo.config, key, 64)
    bases = {}
    for name in args.models:  # eager figures of every model first: they matter most
        log(f"building {name}")
        bases[name] = bart_base() if name == "bart-base" else blip_base(args.image_size)
        result["rows"].append(measure_model(name, bases[name], args, timing))
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        write(args.result_name, result, markdown(result))  # a run cut short keeps its models
    for name, row in zip(args.models, result["rows"]):
        measure_compiled(name, bases[name].to(args.device), args, timing, row)
        write(args.result_name, result, markdown(result))
    return result


def _compile_lists(spec) -> list:
    return list(spec.values()) if isinstance(spec, dict) else [spec]


def markdown(result: dict) -> str:
    m = result["machine"]
    where = m.get("gpu", f"{m['cores']}-core CPU ({m['threads']} threads)")
    rows = result["rows"]
    lines = [
        f"# Adapter step, memory and merged inference ({where}, {result['dtype']}, batch "
        f"{rows[0]['batch'] if rows else '?'})",
        "",
        f"Rank {result['rank']}, median ratios of {result['repeats']} alternating pairs after "
        "warm-up; random weights; targets: BART q_proj, v_proj; BLIP vision qkv, text query, "
        f"value. ReSoRA kernel kind at max_samples {result.get('kernel_max_samples', 512)}.",
        "",
        "| figure | target | " + " | ".join(r["model"] for r in rows) + " | verdict |",
        "|---|---|" + "---|" * len(rows) + "---|",
    ]

    def line(label, key, target, fmt="{:.3f}", limit=None):
        values = [r.get(key) for r in rows]
        present = [v for v in values if v is not None]
        if not present:
            return
        cells = " | ".join("–" if v is None else fmt.format(v) for v in values)
        if target == "report":
            lines.append(f"| {label} | report | {cells} | – |")
            return
        bound = limit if limit is not None else float(target.strip("≤ %"))
        lines.append(f"| {label} | {target} | {cells} | {verdict(max(present), bound)} |")

    line("vlpeft LoRA step / peft LoRA", "ratio_lora", "≤ 1.00")
    line("Null-LoRA step / peft LoRA", "ratio_null-lora", "≤ 1.05")
    line("FLoRA-linear step / peft LoRA", "ratio_flora", "≤ 1.05")
    line("routed LoRA (proj) step / peft LoRA", "ratio_routed-lora", "≤ 1.05")
    for variant in result.get("compile", []):
        method, mode = variant.split(":")
        line(f"{method} compiled ({mode}) step / eager {method}", f"compiled_{variant}", "report")
        line(f"{method} compiled ({mode}) step / peft LoRA (eager)",
             f"compiled_vs_peft_{variant}", "report")  # fmt: skip
        line(f"{method} compiled ({mode}): compilation, s", f"compile_seconds_{variant}",
             "report", "{:.0f}")  # fmt: skip
    for kind in ("linear", "cosine", "euclidean"):
        line(f"ReSoRA {kind}: added step time", f"resora_{kind}_added", "≤ 5 %", "{:+.1%}", 0.05)
    line(f"ReSoRA kernel (max_samples {result.get('kernel_max_samples', 512)}): added step time",
         "resora_kernel_added", "≤ 25 %", "{:+.1%}", 0.25)  # fmt: skip
    line("Null-LoRA training memory / LoRA", "memory_ratio", "≤ 1.10")
    for method in METHODS:
        line(f"{method} training memory / peft LoRA", f"memory_ratio_{method}", "report")
    line("merged LoRA inference / base model", "merged_ratio", "≤ 1.02")
    lines += [
        "",
        "Seconds per step, each method beside the peft LoRA step timed in its own pair:",
        "",
    ]
    for r in rows:
        pairs = "; ".join(
            f"{method} {r[f'step_{method}']:.4f} vs peft {r[f'anchor_{method}']:.4f}"
            for method in METHODS
        )
        lines.append(f"- {r['model']}: {pairs}; base model inference {r['infer_base']:.4f}")
    lines.append("")
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
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["bart-base", "blip-base"],
                        choices=["bart-base", "blip-base"])  # fmt: skip
    parser.add_argument("--compile", nargs="*", default=None, metavar="METHOD:MODE",
                        help="compiled variants, e.g. null-lora:adapters routed-lora:model")  # fmt: skip
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--quick", action="store_true", help="3 repetitions (a smoke run)")
    parser.add_argument("--gpu-quick", action="store_true",
                        help="the whole GPU table in a few minutes: 8 pairs, 3 warm-ups, the "
                        "compiled variants of the methods that missed")  # fmt: skip
    parser.add_argument("--out", default=None, help="result name (default adapters_<cpu|gpu>)")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.batch = args.batch or (32 if gpu else 2)
    args.image_size = args.image_size or (384 if gpu else 224)
    if args.gpu_quick:
        args.repeats, args.warmup = 8, 3
        args.compile = dict(GPU_QUICK_COMPILE) if args.compile is None else args.compile
    args.compile = args.compile or []
    for variant in {v for vs in _compile_lists(args.compile) for v in vs}:
        method, _, mode = variant.partition(":")
        if method not in METHODS or mode not in ("model", "adapters"):
            parser.error(
                f"--compile {variant!r}: METHOD:MODE with METHOD in {METHODS}, MODE model|adapters"
            )
    args.result_name = args.out or f"adapters_{'gpu' if gpu else 'cpu'}"
    with tempfile.TemporaryDirectory(prefix="vlpeft-bench-nullspace-") as args.svd_cache:
        return run(args)


if __name__ == "__main__":
    main()
