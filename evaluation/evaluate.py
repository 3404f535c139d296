"""Predict and score: official submission files and a scores JSON per task and split.

:func:`evaluate_task` is a loop that knows no task by name: the task predicts (generate, choices,
classify or rank), scores with its official metric and writes its submission. Under ``out_dir`` it
writes ``<task>_<split>_predictions.<json|csv>`` in the official submission format (VQA
``[{"question_id", "answer"}]``, GQA ``[{"questionId", "prediction"}]``, COCO captions
``[{"image_id", "caption"}]``, NLVR² a CSV ``identifier,True|False``, retrieval the top-10 lists)
and ``<task>_<split>.json`` with all scores and the headline metric (the official one), and
where a published reference evaluator's rules differ (``Task.reference_scores``: VQA's and GQA's
by VL-Adapter's) its score beside it, in the headline's units: ``"reference": {"vladapter": …}``. ``max_records`` cuts only a
split with answers: a server's submission file always holds every question (:func:`record_limit`).
:func:`evaluate_mixed` evaluates several tasks in one pass of batches that mix their records
(``batch["adapter_names"]``), with the same files and scores.

The command that evaluates a finished run is ``python -m launch.evaluate RUN_DIR``: loading a run
needs the training config, which belongs to ``launch``.
"""

from __future__ import annotations

import itertools
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from tasks.provenance import evaluated_data
from vlpeft import set_row_adapters
from vlpeft.checkpoint import atomic_write, write_json

log = logging.getLogger("vlpeft.evaluate")


def record_limit(task, split: str, max_records: int | None) -> tuple[int | None, int | None]:
    """(the loader's ``limit``, the ``max_records`` recorded with the scores) for ``split``.

    ``max_records`` (a run's ``eval.max_records``) or the task's own ``max_records`` cut an
    annotated split; a split without answers (a test split for an evaluation server) is predicted
    whole — a submission file of the first N questions would be refused or scored as wrong by the
    server — and one log line says so."""
    if not (max_records or task.config.max_records):
        return None, None
    every = task.read_named(task.split_name(split))
    if task.scorable(every):
        return max_records, max_records
    log.info(
        "%s/%s has no answers: all %d records are predicted for the submission file "
        "(max_records %s does not apply to a split without answers)",
        task.config_name, split, len(every), max_records or task.config.max_records,
    )  # fmt: skip
    return len(every), None


@torch.no_grad()
def evaluate_task(model, router, name: str, split: str, out_dir: str | Path, settings) -> dict:
    """Predicts ``split`` of task ``name``, writes predictions + scores under ``out_dir``.

    Args:
        model: the VL model (its adapters for every task of ``router``).
        router: a :class:`tasks.router.TaskRouter`.
        name, split: the task and split to evaluate.
        out_dir: where the files go.
        settings: ``max_new_tokens``, ``num_beams``, ``itm_k``, ``max_records`` (a training config's
            ``eval`` section; ``max_records`` cuts annotated splits only, see :func:`record_limit`).

    Returns:
        The scores record written to ``<task>_<split>.json``.
    """
    model.eval()
    router.activate(model, name)
    task = router[name]
    limit, max_records = record_limit(task, split, settings.max_records)
    loader = router.loader(name, split, model, limit=limit)
    records = loader.dataset.records
    batches = tqdm(loader, desc=f"eval {name}/{split}", leave=False)
    predictions = task.predict(model, records, batches, settings)
    return write_results(task, split, records, predictions, out_dir, max_records)


def write_results(task, split: str, records, predictions, out_dir, max_records) -> dict:
    """Scores ``predictions`` of ``records`` (when the split has answers), writes the submission
    file and ``<task>_<split>.json``; returns the scores record."""
    name = task.config_name
    scorable = task.scorable(records)  # a test split without annotations: submission only
    scores, headline = task.score(records, predictions) if scorable else (None, None)
    reference = task.reference_scores(records, predictions) if scorable else {}
    submission = task.submission(records, predictions)
    out = Path(out_dir)
    path = out / task.submission_name(split)
    if task.submission_format == "csv":
        atomic_write(path, lambda tmp: Path(tmp).write_text(submission))
    else:
        write_json(path, submission)
    record = {"task": name, "reader": task.name, "split": split, "predicts": task.predicts,
              "metric": task.metric, "headline": headline, "scores": scores,
              "data": evaluated_data(task, split, records, max_records)}  # fmt: skip
    if reference:  # the published reference evaluators' rules where they differ (VQA, GQA)
        record["reference"] = reference
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


# -- every task of a run in one pass: mixed-task batches ------------------------------------------
class _Replay:
    """Stands in for the model in a task's ``predict``: gives back the texts generated for its
    records in a mixed batch, so the task's own post-processing (VQA's lower case) applies."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def generate(self, batch, **_) -> list[str]:
        return self.texts


def mixed_batch(parts: list[tuple[str, dict]], router) -> dict:
    """One batch of the rows of several tasks' batches (``[(task, collated batch)]``), each row
    with its task's adapter set and routing function (``adapter_names``, ``routings``)."""
    batch: dict = {"adapter_names": [], "routings": [], "kind": []}
    for name, part in parts:
        n = len(part["ids"])
        config = router[name].config
        batch["adapter_names"] += [config.adapter] * n
        batch["routings"] += [config.routing] * n
        batch["kind"] += [part.get("kind")] * n
        for key in ("text", "targets", "ids"):
            batch.setdefault(key, []).extend(part.get(key, [""] * n))
    for key in ("images", "features"):
        if all(key in part for _, part in parts):
            batch[key] = torch.cat([part[key] for _, part in parts])
    kinds = set(batch["kind"])
    batch["kind"] = kinds.pop() if len(kinds) == 1 else batch["kind"]  # a per-row list: mixed
    return batch


def mixed_order(sizes: dict[str, int]) -> list[tuple[str, int]]:
    """(task, record index) of every record, the tasks taking turns, so that batches mix them."""
    turns = itertools.zip_longest(*([(name, i) for i in range(n)] for name, n in sizes.items()))
    return [item for turn in turns for item in turn if item is not None]


@torch.no_grad()
def evaluate_mixed(model, router, split: str, out_dir: str | Path, settings, tasks=None) -> dict:
    """Every task (default: all of ``router``'s) of a per-task-adapter run in one pass: batches of
    ``eval_batch_size`` (the largest of the tasks') mix the tasks' records, each row through its
    own task's adapter set and routing function (``batch["adapter_names"]``, peft's mixed batches).
    The files and scores are :func:`evaluate_task`'s; a task that does not predict by generating
    text (NLVR²'s choices, retrieval's ranking) is evaluated on its own, and tasks with other
    generation settings (a task's own ``num_beams``/``max_new_tokens``) in batches of their own.

    Returns:
        ``{"<task>/<split>": record}`` like :func:`evaluate_all`.
    """
    model.eval()
    names = list(tasks or router.tasks)
    mixed = [n for n in names if router[n].predicts == "generate"]
    datasets, limits = {}, {}
    for name in mixed:
        limit, limits[name] = record_limit(router[name], split, settings.max_records)
        datasets[name] = router.dataset(name, split, model, limit=limit)
    texts: dict[str, list[str]] = {name: [] for name in mixed}
    # one generation call cannot mix beam counts or lengths: tasks that generate alike share it
    groups: dict[tuple, list[str]] = {}
    for name in mixed:
        groups.setdefault(tuple(router[name].generation(settings).items()), []).append(name)
    for generation, group in groups.items():
        order = mixed_order({name: len(datasets[name]) for name in group})
        size = max(router[n].config.eval_batch_size for n in group)
        for start in tqdm(range(0, len(order), size), desc=f"eval mixed/{split}", leave=False):
            chunk = sorted(order[start : start + size], key=lambda item: group.index(item[0]))
            parts = [
                (name, datasets[name].collate([datasets[name][i] for _, i in rows]))
                for name, rows in itertools.groupby(chunk, key=lambda item: item[0])
            ]
            generated = iter(model.generate(mixed_batch(parts, router), **dict(generation)))
            for name, part in parts:
                texts[name] += [next(generated) for _ in part["ids"]]
    set_row_adapters(model, None)  # the next forwards of the model: the active set again
    results = {}
    for name in names:
        if name not in mixed:
            results[f"{name}/{split}"] = evaluate_task(
                model, router, name, split, out_dir, settings
            )
            continue
        task, records = router[name], datasets[name].records
        predictions = task.predict(_Replay(texts[name]), records, [{"ids": []}], settings)
        results[f"{name}/{split}"] = write_results(
            task, split, records, predictions, out_dir, limits[name]
        )
    return results


def main(argv: list[str] | None = None) -> int:
    print(
        "evaluating a run moved to `python -m launch.evaluate RUN_DIR [--task T] [--split S]`",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
