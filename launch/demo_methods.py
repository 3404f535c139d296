"""The adapter core end to end on tiny transformers models (``python -m launch.demo_methods``).

For each method: inject into a tiny randomly initialised BART or GPT-2, train a few steps on a toy
objective (memorise a fixed token sequence), merge and compare with the unmerged forward, save and
reload into a fresh model, export LoRA-reducible adapters to peft and compare peft's logits; print
one table. The VL demo (``make demo``) is :mod:`launch.demo`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import vlpeft  # noqa: E402
from vlpeft.adapters import (  # noqa: E402
    AdapterConfig,
    DoRAConfig,
    FLoRAConfig,
    LoRAConfig,
    NullLoRAConfig,
    ReSoRAConfig,
)

VOCAB = 64


def tiny_backbone(kind: str, width: int = 64) -> torch.nn.Module:
    """A randomly initialised 2-layer BART or GPT-2 (heads = width / 16, FFN = 2·width), seeded."""
    from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    heads = max(1, width // 16)
    if kind == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB,
            n_embd=width,
            n_layer=2,
            n_head=heads,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        return GPT2LMHeadModel(config)
    config = BartConfig(
        vocab_size=VOCAB,
        d_model=width,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=2 * width,
        decoder_ffn_dim=2 * width,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(config)


def toy_batch(kind: str) -> dict[str, torch.Tensor]:
    """A fixed batch whose labels are a deterministic function of the input (learnable)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (8, 12), generator=g)
    if kind == "gpt2":
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": (ids * 7) % (VOCAB - 3) + 3}


QV = {"c_attn": {"parts": 3, "use": [0, 2]}}
# (label, backbone, adapter config, ReSoRA config or None)
EXPERIMENTS = [
    ("LoRA r=8", "bart", LoRAConfig(targets=["q_proj", "v_proj"], r=8, alpha=16), None),
    (
        "LoRA r=8 + ReSoRA",
        "bart",
        LoRAConfig(targets=["q_proj", "v_proj"], r=8, alpha=16),
        ReSoRAConfig(weight=0.1),
    ),
    ("DoRA r=8", "bart", DoRAConfig(targets=["q_proj", "v_proj"], r=8, alpha=16), None),
    ("LoRA r=8 (q,v of c_attn)", "gpt2", LoRAConfig(targets=["c_attn"], r=8, slices=QV), None),
    (
        "routed LoRA proj (q,v)",
        "gpt2",
        LoRAConfig(targets=["c_attn"], r=8, slices=QV, routing="proj"),
        None,
    ),
    (
        "Adapter m=16",
        "bart",
        AdapterConfig(targets=["self_attn.out_proj", "fc2"], bottleneck=16),
        None,
    ),
    (
        "Adapter m=8 + LN",
        "gpt2",
        AdapterConfig(targets=["mlp.c_proj"], bottleneck=8, trainable=[r"ln_f\."]),
        None,
    ),
    (
        "Null-LoRA + ReSoRA",
        "bart",
        NullLoRAConfig(targets=["q_proj", "v_proj"], min_rank=8),
        ReSoRAConfig(weight=0.1),
    ),
    ("FLoRA r=8", "bart", FLoRAConfig(targets=["q_proj", "v_proj"], r=8, scale=0.5), None),
]


def forward(model: torch.nn.Module, batch: dict):
    """Forward with a per-example x_R (a fixed random vector standing in for an image feature)."""
    x_r = torch.randn(
        batch["input_ids"].shape[0],
        model.config.hidden_size,
        generator=torch.Generator().manual_seed(1),
    )
    with vlpeft.routing_inputs(model, x_r):
        return model(**batch)


def run_one(
    label: str, kind: str, config, resora: ReSoRAConfig | None, steps: int, workdir: str
) -> dict:
    model = tiny_backbone(kind)
    vlpeft.add_adapter(model, config)
    vlpeft.enable_resora(model, resora is not None)
    batch = toy_batch(kind)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = forward(model, batch).loss
        if resora is not None:
            loss = loss + vlpeft.resora_penalty(model, resora)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    vlpeft.enable_resora(model, False)
    with torch.no_grad():
        logits = forward(model, batch).logits
        merge_diff = "n/a (not linear)"
        if all(layer.mergeable for _, layer in vlpeft.adapted_layers(model)):
            vlpeft.merge_adapter(model)
            merge_diff = f"{(forward(model, batch).logits - logits).abs().max().item():.1e}"
            vlpeft.unmerge_adapter(model)
        path = os.path.join(workdir, "".join(c if c.isalnum() else "_" for c in label))
        vlpeft.save_adapter(model, path)
        fresh = vlpeft.load_adapter(tiny_backbone(kind).eval(), path)
        reload_exact = torch.equal(forward(fresh, batch).logits, logits)
        peft_diff = "n/a"
        if all(  # every layer can be written as peft's LoRA/DoRA (the method says)
            layer.adapters["default"].peft_tensors(layer.base_layer) is not None
            for _, layer in vlpeft.adapted_layers(model)
        ):
            from peft import PeftModel

            vlpeft.export_peft_lora(model, path + "_peft")
            peft_model = PeftModel.from_pretrained(tiny_backbone(kind).eval(), path + "_peft")
            peft_diff = f"{(peft_model(**batch).logits - logits).abs().max().item():.1e}"
    trainable, total = vlpeft.count_parameters(model)
    return {
        "method": label,
        "backbone": f"tiny {kind}",
        "trainable": trainable,
        "total": total,
        "loss": f"{losses[0]:.2f} -> {losses[-1]:.2f}",
        "merged-unmerged": merge_diff,
        "reload exact": "yes" if reload_exact else "NO",
        "peft export diff": peft_diff,
    }


def print_table(rows: list[dict]) -> None:
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(keys))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line([r[k] for k in keys]))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per method")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    start = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        rows = [run_one(*experiment, args.steps, workdir) for experiment in EXPERIMENTS]
    print_table(rows)
    print(f"\n{len(rows)} methods in {time.time() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
