"""Is the synthetic set learnable? A tiny model against the majority-answer baseline on its VQA split.

    python -m bench.synthetic_learnable [--steps N] [--family roberta-vit]

Generates the synthetic set, trains a tiny model with LoRA (plus its declared-trainable head) on
the VQA task through the real launcher, and compares the official VQA accuracy on the Karpathy test
split with the majority baseline (the most frequent training answer given to every question).
Writes ``bench/results/synthetic_vqa.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

from evaluation.metrics import vqa_accuracy
from launch.config import load_config
from launch.train import train
from tasks.router import TaskRouter
from tasks.synthetic import generate
from vlpeft.checkpoint import atomic_write, write_json

RESULTS = Path(__file__).parent / "results"


def majority_baseline(data: Path) -> tuple[str, float]:
    router = TaskRouter.from_yaml(data / "tasks.yaml", only=["vqa"])
    majority = Counter(r["target"] for r in router["vqa"].read("train")).most_common(1)[0][0]
    test = router["vqa"].read("test")
    predictions = [{"question_id": r["question_id"], "answer": majority} for r in test]
    annotations = [{"question_id": r["question_id"], "answers": [{"answer": a} for a in r["answers"]],
                    "answer_type": r["answer_type"], "question_type": r["question_type"]} for r in test]  # fmt: skip
    return majority, vqa_accuracy(predictions, annotations)["overall"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--family", default="roberta-vit")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generate(data, images=300, seed=0)
        majority, baseline = majority_baseline(data)
        config = load_config(None, data={
            "model": {"family": args.family, "preset": "tiny"},
            "adapters": {"default": {"method": "lora", "r": 8, "kinds": ["q", "k", "v", "o", "ffn_in"],
                                     "trainable": ["embeddings", "LayerNorm"]}},
            "data": {"file": str(data / "tasks.yaml"), "tasks": {"vqa": {"batch_size": 32}}},
            "train": {"steps": args.steps, "lr": 3e-3, "checkpoint_every": 0, "tensorboard": False},
        })  # fmt: skip
        summary = train(config, Path(tmp) / "run")
    result = {"family": args.family, "steps": args.steps, "majority_answer": majority,
              "majority_accuracy": baseline, "model_accuracy": summary["results"]["vqa/test"],
              "train_seconds": summary["train_seconds"]}  # fmt: skip
    write_json(RESULTS / "synthetic_vqa.json", result)
    table = (
        "| model | steps | VQA accuracy (test) | majority baseline |\n|---|---|---|---|\n"
        f"| {args.family} tiny + LoRA | {args.steps} | {result['model_accuracy']:.2f} | "
        f"{baseline:.2f} ('{majority}') |\n"
    )
    atomic_write(RESULTS / "synthetic_vqa.md", lambda t: Path(t).write_text(table))
    print(table)
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
