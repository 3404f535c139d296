"""The adapter core end to end on tiny transformers models (``make demo``).

For each method: inject into a tiny randomly initialised BART or GPT-2, train a few steps on a toy
objective (memorise a fixed token sequence), merge and compare with the unmerged forward, save and
reload into a fresh model, export LoRA-reducible adapters to peft and compare peft's logits; print
one table. The multitask launcher replaces this with the full VL demo.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import vlpeft  # noqa: E402
from vlpeft.adapters import AdapterConfig, LoRAConfig  # noqa: E402

VOCAB = 64


def tiny_backbone(kind: str) -> torch.nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(
            GPT2Config(
                vocab_size=VOCAB,
                n_embd=64,
                n_layer=2,
                n_head=4,
                n_positions=64,
                bos_token_id=0,
                eos_token_id=0,
            )
        )
    config = BartConfig(
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
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


EXPERIMENTS = [
    ("LoRA r=8", "bart", LoRAConfig(targets=["q_proj", "v_proj"], r=8, alpha=16)),
    (
        "LoRA r=8 (q,v of c_attn)",
        "gpt2",
        LoRAConfig(targets=["c_attn"], r=8, slices={"c_attn": {"parts": 3, "use": [0, 2]}}),
    ),
    ("Adapter m=16", "bart", AdapterConfig(targets=["self_attn.out_proj", "fc2"], bottleneck=16)),
    (
        "Adapter m=8 + LN",
        "gpt2",
        AdapterConfig(targets=["mlp.c_proj"], bottleneck=8, trainable=[r"ln_f\."]),
    ),
]


def run_one(label: str, kind: str, config, steps: int, workdir: str) -> dict:
    model = tiny_backbone(kind)
    vlpeft.add_adapter(model, config)
    batch = toy_batch(kind)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
        merge_diff = "n/a (nonlinear)"
        if all(layer.mergeable for _, layer in vlpeft.adapted_layers(model)):
            vlpeft.merge_adapter(model)
            merge_diff = f"{(model(**batch).logits - logits).abs().max().item():.1e}"
            vlpeft.unmerge_adapter(model)
        path = os.path.join(workdir, label.replace(" ", "_"))
        vlpeft.save_adapter(model, path)
        fresh = vlpeft.load_adapter(tiny_backbone(kind).eval(), path)
        reload_exact = torch.equal(fresh(**batch).logits, logits)
        peft_diff = "n/a"
        if all(
            layer.adapters["default"].lora_reducible for _, layer in vlpeft.adapted_layers(model)
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
    start = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        rows = [
            run_one(label, kind, config, args.steps, workdir) for label, kind, config in EXPERIMENTS
        ]
    print_table(rows)
    print(f"\n{len(rows)} methods in {time.time() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
