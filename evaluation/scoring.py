"""Scoring that knows no task: exact match, ranks, recall@K (pure functions, the leaf tasks call).

This module imports nothing of the project, so a task file may use it (``tasks`` sits below
``evaluation`` otherwise). Each task's official metric lives in its own file and uses these pieces:
GQA's accuracy is :func:`exact_match_accuracy` (:func:`verbatim_accuracy` its reference rule);
retrieval's R@K both ways is
:func:`best_target_ranks` + :func:`recall_at_k`. :mod:`evaluation.metrics` gives every metric by
name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def exact_match_accuracy(predictions: dict, answers: dict) -> float:
    """% of questions whose stripped, lower-cased prediction equals the answer (GQA's accuracy).

    Args:
        predictions: question id → predicted answer (a string).
        answers: question id → the right answer; the same ids as ``predictions``.

    Example:
        >>> exact_match_accuracy({"a": "Cat ", "b": "dog"}, {"a": "cat", "b": "bird"})
        50.0
    """
    _check_answers(predictions, answers, "exact_match_accuracy")
    hits = sum(predictions[q].strip().lower() == answers[q].strip().lower() for q in answers)
    return 100 * hits / len(answers)


def verbatim_accuracy(predictions: dict, answers: dict) -> float:
    """% of questions whose prediction equals the answer character for character (no stripping,
    no case folding): the same arguments as :func:`exact_match_accuracy`.

    Example:
        >>> verbatim_accuracy({"a": "Cat ", "b": "dog"}, {"a": "cat", "b": "dog"})
        50.0
    """
    _check_answers(predictions, answers, "verbatim_accuracy")
    return 100 * sum(predictions[q] == answers[q] for q in answers) / len(answers)


def _check_answers(predictions: dict, answers: dict, name: str) -> None:
    if set(predictions) != set(answers):
        raise ValueError(f"{name}: predictions and answers cover different questions")
    if not answers:
        raise ValueError(f"{name}: no questions to score")
    bad = [q for q in answers if not isinstance(predictions[q], str)]
    if bad:
        raise ValueError(f"{name}: the prediction of question {bad[0]!r} is not a string")


def best_target_ranks(scores: np.ndarray, targets: list[np.ndarray]) -> np.ndarray:
    """Rank (0 = first) of the best target of each row: the number of *wrong* candidates scoring
    ≥ the best correct one. Ties with a wrong candidate count against the model (a constant scorer
    gets no credit); ties among a row's own targets do not.

    Args:
        scores: (rows, candidates) scores, higher is better.
        targets: for each row, the indices of its correct candidates.
    """
    ranks = np.empty(len(scores), dtype=int)
    for row, target in enumerate(targets):
        wrong = np.ones(scores.shape[1], dtype=bool)
        wrong[target] = False
        best = scores[row, target].max()
        ranks[row] = int((scores[row, wrong] >= best).sum())
    return ranks


def recall_at_k(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """R@K (0–100) for each K of ``ks``: the % of rows whose rank (0 = first) is below K.

    Example:
        >>> recall_at_k(np.array([0, 3]), ks=(1, 5))
        {1: 50.0, 5: 100.0}
    """
    return {k: 100 * float((ranks < k).mean()) for k in ks}


def reference_key(key: str, evaluator: str) -> str:
    """run.json's results key of a score by a reference evaluator's rules: ``"<task>/<split>"``
    + ``_<evaluator>`` (``vqa/test_vladapter``)."""
    return f"{key}_{evaluator}"
