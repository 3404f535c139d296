"""Baselines that never look at an image, scored like a model: the floor a leaderboard row must clear.

    python -m evaluation.baselines TASKS_YAML [--tasks T …] [--split test]

- VQA, GQA: the most frequent training answer, given to every question;
- NLVR²: the more frequent training label, for every statement;
- captions: the most frequent training caption, for every image;
- retrieval: the expected recall of a uniformly random ranking, computed exactly (t2i R@K = K/N
  images; i2t R@K = 1 - C(T - n, K) / C(T, K) for an image with n of the T captions).

Predictions go through the scorers of :mod:`evaluation.evaluate` (the official metrics) on the
same records. :func:`baseline_summary` returns a summary shaped like a run's ``run.json``, so
:mod:`evaluation.leaderboard` renders it as one more row.
"""

from __future__ import annotations

import argparse
from collections import Counter
from math import comb

from evaluation import metrics
from evaluation.evaluate import SCORERS
from tasks.router import TaskRouter


def most_common(values, what: str):
    counts = Counter(values)
    if not counts:
        raise ValueError(f"{what}: none in the training split to take the majority of")
    return counts.most_common(1)[0][0]


def random_ranking_recall(positives: list[int], ks=(1, 5, 10)) -> dict[str, float]:
    """Expected recall (in %) of a uniformly random ranking; ``positives[i]`` = captions of image i."""
    images, texts = len(positives), sum(positives)
    scores = {}
    for k in ks:
        scores[f"i2t_r{k}"] = (
            100
            * sum(
                1 - comb(texts - n, min(k, texts)) / comb(texts, min(k, texts)) for n in positives
            )
            / images
        )
        scores[f"t2i_r{k}"] = 100 * min(k, images) / images
    return metrics.with_recall_means(scores, ks)


def baseline_scores(router: TaskRouter, name: str, split: str = "test") -> tuple[str, dict, float]:
    """(what the baseline does, all scores, headline) for task ``name`` on ``split``."""
    task = router[name]
    records = task.read(split)
    if task.name == "retrieval":
        scores = random_ranking_recall([len(r["captions"]) for r in records])
        return "random ranking", scores, scores["r_mean"]
    train = task.read("train")
    if task.name == "nlvr2":
        label = most_common((bool(r["label"]) for r in train), f"task {name}: labels")
        scores = metrics.nlvr2_scores(
            {r["id"]: label for r in records}, {r["id"]: bool(r["label"]) for r in records}
        )
        return f"always {label}", scores, scores["accuracy"]
    if task.name == "caption":
        answer = most_common((c for r in train for c in r["captions"]), f"task {name}: captions")
    else:
        answer = most_common((r["target"] for r in train), f"task {name}: answers")
    _, scores, headline = SCORERS[task.name](records, [answer] * len(records))
    return f"always {answer!r}", scores, headline


def baseline_summary(router: TaskRouter, tasks: list[str], split: str = "test") -> dict:
    """A ``run.json``-shaped summary whose results are the baselines of ``tasks``."""
    results, notes = {}, {}
    for name in tasks:
        note, _, headline = baseline_scores(router, name, split)
        results[f"{name}/{split}"] = headline
        notes[name] = note
    return {
        "run": "baseline",
        "method": "no image",
        "baselines": notes,
        "backbone": "none",
        "trainable": 0,
        "train_seconds": 0.0,
        "results": results,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tasks_yaml", help="a task-router YAML (tasks.synthetic writes one)")
    parser.add_argument("--tasks", nargs="*", help="task names (default: all in the file)")
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    router = TaskRouter.from_yaml(args.tasks_yaml, only=args.tasks or None)
    summary = {}
    for name in router.tasks:
        note, scores, headline = baseline_scores(router, name, args.split)
        summary[name] = {"baseline": note, "headline": headline, "scores": scores}
        print(f"{name}/{args.split}: {headline:.2f} ({note})")
    return summary


if __name__ == "__main__":
    main()
