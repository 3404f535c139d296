"""Predict and score: official submission files and a scores JSON per task and split.

:func:`evaluate_task` is a loop that knows no task by name: the task predicts (generate, choices,
classify or rank), scores with its official metric and writes its submission. Under ``out_dir`` it
writes ``<task>_<split>_predictions.<json|csv>`` in the official submission format (VQA
``[{"question_id", "answer"}]``, GQA ``[{"questionId", "prediction"}]``, COCO captions
``[{"image_id", "caption"}]``, NLVR² a CSV ``identifier,True|False``, retrieval the top-10 lists)
and ``<task>_<split>.json`` with all scores and the headline metric.

The command that evaluates a finished run is ``python -m launch.evaluate RUN_DIR``: loading a run
needs the training config, which belongs to ``launch``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from tasks.provenance import evaluated_data
from vlpeft.checkpoint import atomic_write, write_json

log = logging.getLogger("vlpeft.evaluate")


@torch.no_grad()
def evaluate_task(model, router, name: str, split: str, out_dir: str | Path, settings) -> dict:
    """Predicts ``split`` of task ``name``, writes predictions + scores under ``out_dir``.

    Args:
        model: the VL model (its adapters for every task of ``router``).
        router: a :class:`tasks.router.TaskRouter`.
        name, split: the task and split to evaluate.
        out_dir: where the files go.
        settings: ``max_new_tokens``, ``num_beams``, ``itm_k``, ``max_records`` (a training config's
            ``eval`` section).

    Returns:
        The scores record written to ``<task>_<split>.json``.
    """
    model.eval()
    router.activate(model, name)
    task = router[name]
    loader = router.loader(name, split, model, limit=settings.max_records)
    records = loader.dataset.records
    batches = tqdm(loader, desc=f"eval {name}/{split}", leave=False)
    predictions = task.predict(model, records, batches, settings)
    scorable = task.scorable(records)  # a test split without annotations: submission only
    scores, headline = task.score(records, predictions) if scorable else (None, None)
    submission = task.submission(records, predictions)
    out = Path(out_dir)
    path = out / task.submission_name(split)
    if task.submission_format == "csv":
        atomic_write(path, lambda tmp: Path(tmp).write_text(submission))
    else:
        write_json(path, submission)
    record = {"task": name, "reader": task.name, "split": split, "predicts": task.predicts,
              "metric": task.metric, "headline": headline, "scores": scores,
              "data": evaluated_data(task, split, records, settings.max_records)}  # fmt: skip
    record["predictions"] = str(path)
    if not scorable:
        record["note"] = (
            f"{name}/{split} has no annotations: it cannot be scored locally; submit {path} to "
            "the evaluation server"
        )
        log.warning(record["note"])
    write_json(out / f"{name}_{split}.json", record)
    return record


def evaluate_all(model, router, splits, out_dir: str | Path, settings, tasks=None) -> dict:
    """:func:`evaluate_task` for every task (default: all of ``router``'s) and split:
    ``{"<task>/<split>": record}``."""
    return {
        f"{name}/{split}": evaluate_task(model, router, name, split, out_dir, settings)
        for name in (tasks or list(router.tasks))
        for split in splits
    }


def main(argv: list[str] | None = None) -> int:
    print(
        "evaluating a run moved to `python -m launch.evaluate RUN_DIR [--task T] [--split S]`",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
