"""Predict and score: official submission files and a scores JSON per task and split.

    python -m evaluation.evaluate RUN_DIR [--task T] [--split S]

Loads the run's model and adapters (``launch.run.load_run``), predicts with a progress bar and
writes under ``RUN_DIR/eval/``: ``<task>_<split>_predictions.json`` in the official submission
format (VQA ``[{"question_id", "answer"}]``, GQA ``[{"questionId", "prediction"}]``, COCO captions
``[{"image_id", "caption"}]``, NLVR² a CSV ``identifier,True|False``, retrieval the top-10 lists)
and ``<task>_<split>.json`` with all scores and the headline metric (accuracy; CIDEr for captions;
mean recall for retrieval).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from evaluation import metrics
from vlpeft.checkpoint import atomic_write, write_json


def _batches(router, name: str, split: str, model, max_records: int | None):
    task = router[name]
    loader = router.loader(name, split, model, limit=max_records)
    return task, loader.dataset.records, tqdm(loader, desc=f"eval {name}/{split}", leave=False)


@torch.no_grad()
def predict_generate(model, router, name, split, cfg) -> tuple[Any, list[dict], list[str]]:
    task, records, loader = _batches(router, name, split, model, cfg.max_records)
    answers = []
    for batch in loader:
        answers += model.generate(batch, max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams)
    return task, records, answers


def score_vqa(records, answers):
    predictions = [{"question_id": r["question_id"], "answer": a} for r, a in zip(records, answers)]
    annotations = [
        {"question_id": r["question_id"], "answers": [{"answer": a} for a in r["answers"]],
         "answer_type": r["answer_type"], "question_type": r["question_type"]}
        for r in records
    ]  # fmt: skip
    scores = metrics.vqa_accuracy(predictions, annotations)
    return predictions, scores, scores["overall"]


def score_gqa(records, answers):
    predictions = [{"questionId": r["id"], "prediction": a} for r, a in zip(records, answers)]
    accuracy = metrics.exact_match_accuracy({r["id"]: a for r, a in zip(records, answers)},
                                            {r["id"]: r["target"] for r in records})  # fmt: skip
    return predictions, {"accuracy": accuracy}, accuracy


def score_caption(records, answers):
    predictions = [{"image_id": r["image_id"], "caption": a} for r, a in zip(records, answers)]
    scores = metrics.caption_scores({r["image_id"]: a for r, a in zip(records, answers)},
                                    {r["image_id"]: r["captions"] for r in records})  # fmt: skip
    return predictions, scores, scores["CIDEr"]


@torch.no_grad()
def evaluate_nlvr2(model, router, name, split, cfg):
    task, records, loader = _batches(router, name, split, model, cfg.max_records)
    said = []
    for batch in loader:
        scores = model.score_choices(batch, list(task.choices))
        said += (scores[:, 0] > scores[:, 1]).tolist()  # choices = ("true", "false")
    predicted = {r["id"]: bool(s) for r, s in zip(records, said)}
    scores = metrics.nlvr2_scores(predicted, {r["id"]: bool(r["label"]) for r in records})
    text = io.StringIO()
    csv.writer(text).writerows([(k, str(v)) for k, v in predicted.items()])
    return text.getvalue(), scores, scores["accuracy"]


@torch.no_grad()
def evaluate_retrieval(model, router, name, split, cfg):
    task, records, loader = _batches(router, name, split, model, cfg.max_records)
    image_feats, image_states = [], []
    for batch in loader:
        feats, states = model.encode_images(batch["images"])
        image_feats.append(feats.float())
        image_states.append(states)
    texts = [c for r in records for c in r["captions"]]
    owner = [i for i, r in enumerate(records) for _ in r["captions"]]
    size = router[name].config.eval_batch_size
    text_feats = torch.cat(
        [model.encode_texts(texts[i : i + size]).float() for i in range(0, len(texts), size)]
    )
    image_feats, image_states = torch.cat(image_feats), torch.cat(image_states)
    sim = (image_feats @ text_feats.T).cpu().numpy()
    if cfg.itm_k:

        def itm_i2t(row, cols):
            states = image_states[row : row + 1].expand(len(cols), -1, -1)
            return model.match(states, [texts[c] for c in cols])[:, 1].float().cpu().numpy()

        def itm_t2i(row, cols):
            return (
                model.match(image_states[torch.as_tensor(cols)], [texts[row]] * len(cols))[:, 1]
                .float()
                .cpu()
                .numpy()
            )

        i2t = metrics.itm_rerank(sim, itm_i2t, cfg.itm_k)
        t2i = metrics.itm_rerank(sim.T, itm_t2i, cfg.itm_k)
        scores = {**_directional(i2t, owner, "i2t"), **_directional(t2i.T, owner, "t2i")}
        scores["r_mean"] = (scores["i2t_mean"] + scores["t2i_mean"]) / 2
        sim = i2t
    else:
        scores = metrics.retrieval_recall(sim, owner)
    top = {
        r["image_id"]: [texts[j] for j in np.argsort(-sim[i], kind="stable")[:10]]
        for i, r in enumerate(records)
    }
    return top, scores, scores["r_mean"]


def _directional(scores, owner, direction: str) -> dict:
    full = metrics.retrieval_recall(scores, owner)
    return {k: v for k, v in full.items() if k.startswith(direction)}


SCORERS = {"vqa": score_vqa, "gqa": score_gqa, "caption": score_caption}


def evaluate_task(model, router, name: str, split: str, out_dir: str | Path, cfg) -> dict:
    """Predicts ``split`` of task ``name``, writes predictions + scores under ``out_dir``.

    ``cfg`` carries ``max_new_tokens``, ``num_beams``, ``itm_k``, ``max_records`` (the ``eval``
    section of the training config). Returns the scores record written to ``<task>_<split>.json``.
    """
    model.eval()
    router.activate(model, name)
    task = router[name]
    if task.name == "nlvr2":
        predictions, scores, headline = evaluate_nlvr2(model, router, name, split, cfg)
    elif task.name == "retrieval":
        predictions, scores, headline = evaluate_retrieval(model, router, name, split, cfg)
    else:
        _, records, answers = predict_generate(model, router, name, split, cfg)
        predictions, scores, headline = SCORERS[task.name](records, answers)
    out = Path(out_dir)
    if isinstance(predictions, str):
        path = out / f"{name}_{split}_predictions.csv"
        atomic_write(path, lambda tmp: Path(tmp).write_text(predictions))
    else:
        write_json(out / f"{name}_{split}_predictions.json", predictions)
    record = {"task": name, "reader": task.name, "split": split, "metric": task.metric, "headline": headline,
              "scores": scores}  # fmt: skip
    write_json(out / f"{name}_{split}.json", record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Predict and score a run's tasks (official metrics)."
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--task", action="append", help="task name (repeatable; default: all of the run's)"
    )
    parser.add_argument("--split", default=None, help="split (default: the run's eval.splits)")
    args = parser.parse_args(argv)
    from launch.run import load_run

    model, router, config = load_run(args.run_dir)
    splits = [args.split] if args.split else list(config.eval.splits)
    for name in args.task or list(router.tasks):
        for split in splits:
            record = evaluate_task(model, router, name, split, args.run_dir / "eval", config.eval)
            print(json.dumps({k: record[k] for k in ("task", "split", "metric", "headline")}))


if __name__ == "__main__":
    main()
