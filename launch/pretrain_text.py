"""Denoising warm start of a randomly initialised BART on the words of a run's training tasks.

    python -m launch.pretrain_text --config FILE --out DIR [--steps N --batch-size B --lr LR]

A real CLIP-BART run starts from pretrained BART, whose attention already reads its input and whose
decoder already writes words; PEFT then only steers it. A ``tiny`` preset is random, and a frozen
random decoder barely reads the encoder, so adapters alone have to build that ability from nothing.
This command stands in for the pretraining: BART's text-infilling objective (Lewis et al. 2020) on
the training text of the config's tasks: questions and statements with their task prompts, and
captions. Answers and labels are never shown. Each word token is masked with probability ``mask``
and every run of masked tokens becomes one ``[MASK]``; the decoder reconstructs the sentence.

DIR is written in transformers' format (``config.json`` + ``model.safetensors``), atomically, so
``model.overrides: {pretrained: true, weights: {text: DIR}}`` loads it through the same code as a
hub checkpoint. The model is built from the config's ``model`` section with random weights
(``pretrained`` and ``weights`` ignored), so DIR matches the architecture the run asks for.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.models.bart.modeling_bart import shift_tokens_right

import vlpeft
from launch.config import ConfigError, TrainConfig, load_config
from launch.engine import linear_schedule
from launch.run import build_router
from vlpeft.models.base import lm_loss, pad_to_ignore


def training_text(config: TrainConfig) -> list[str]:
    """Every distinct input text of the tasks' train splits, as each task feeds it to the model
    (``Task.input_texts``: questions and statements with their prompts, captions as they are)."""
    router = build_router(config)
    seen: dict[str, None] = {}
    for task in router.tasks.values():
        for record in task.read("train"):
            for text in task.input_texts(record):
                seen.setdefault(text)
    if not seen:
        raise ConfigError(f"{config.data.file}: the configured tasks have no training text")
    return list(seen)


def infill(ids: list[int], mask_id: int, p: float, rng: random.Random) -> list[int]:
    """Text infilling: mask each token with probability p; a run of masked tokens becomes one mask."""
    out: list[int] = []
    for token in ids:
        if rng.random() < p:
            if not out or out[-1] != mask_id:
                out.append(mask_id)
        else:
            out.append(token)
    return out


def corrupt(
    ids: list[int], special: set[int], mask_id: int, p: float, rng: random.Random
) -> list[int]:
    """:func:`infill` on the words of ``ids``, keeping its leading and trailing special tokens."""
    start = next((i for i, t in enumerate(ids) if t not in special), len(ids))
    end = len(ids) - next((i for i, t in enumerate(reversed(ids)) if t not in special), 0)
    return ids[:start] + infill(ids[start:end], mask_id, p, rng) + ids[end:]


def pretrain(
    config: TrainConfig,
    out: Path,
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 1e-3,
    mask: float = 0.3,
    seed: int = 0,
) -> dict:
    """Trains the text model of ``config``'s backbone by denoising and saves it to ``out``."""
    if config.model.family != "clip-bart":
        raise ConfigError(
            f"model.family: the denoising warm start is written for clip-bart (BART), got {config.model.family!r}"
        )
    overrides = {
        k: v for k, v in config.model.overrides.items() if k not in ("pretrained", "weights")
    }
    model = vlpeft.build_model(config.model.family, config.model.preset, **overrides)
    bart, tokenizer = model.bart, model.tokenizer
    if tokenizer.mask_token_id is None:
        raise ConfigError(f"tokenizer {model.config.tokenizer!r} has no mask token")
    texts = training_text(config)
    encoded = tokenizer(texts, truncation=True, max_length=model.config.max_text_length)[
        "input_ids"
    ]
    special = set(tokenizer.all_special_ids)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(bart.parameters(), lr=lr, weight_decay=0.01)
    schedule = linear_schedule(optimizer, steps, 0.1)
    pad = bart.config.pad_token_id
    start = bart.config.decoder_start_token_id

    bart.train()
    losses, begin = [], time.perf_counter()
    for _ in tqdm(range(steps), desc="denoising warm start", mininterval=2):
        rows = [encoded[rng.randrange(len(encoded))] for _ in range(batch_size)]
        noisy = [corrupt(ids, special, tokenizer.mask_token_id, mask, rng) for ids in rows]
        inputs = tokenizer.pad({"input_ids": noisy}, return_tensors="pt")
        targets = tokenizer.pad({"input_ids": rows}, return_tensors="pt")
        labels = pad_to_ignore(targets["input_ids"], targets["attention_mask"])
        logits = bart(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            decoder_input_ids=shift_tokens_right(labels, pad, start),
        ).logits
        loss = lm_loss(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bart.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    report = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "mask": mask,
        "sentences": len(texts),
        "loss_first": losses[0],
        "loss_last": sum(losses[-20:]) / len(losses[-20:]),
        "seconds": time.perf_counter() - begin,
    }
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bart.eval().save_pretrained(tmp, safe_serialization=True)
    (tmp / "pretrain.json").write_text(json.dumps(report, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a launch.train YAML config")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mask", type=float, default=0.3, help="token masking probability")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args(argv)
    if not 0 < args.mask < 1:
        parser.error("--mask must be in (0, 1)")
    config = load_config(args.config, args.overrides)
    report = pretrain(config, args.out, args.steps, args.batch_size, args.lr, args.mask, args.seed)
    print(
        f"wrote {args.out}: loss {report['loss_first']:.2f} -> {report['loss_last']:.2f} "
        f"in {report['seconds']:.0f} s ({report['sentences']} sentences)"
    )
    return report


if __name__ == "__main__":
    main()
