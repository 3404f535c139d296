"""The official metrics by name (pure functions). Each lives with what it scores:

- :func:`vqa_accuracy` (:mod:`tasks.vqa`): the official VQA evaluation — answers normalised in the
  official order and conditions, leave-one-out accuracy over the 10 answers; overall, per answer
  type and per question type, 0–100;
- :func:`exact_match_accuracy` (:mod:`evaluation.scoring`; GQA's accuracy);
- :func:`nlvr2_scores` (:mod:`tasks.nlvr2`): accuracy and consistency;
- :func:`caption_scores` (:mod:`tasks.caption`): pycocoevalcap's PTB tokenizer and BLEU-1..4,
  METEOR, ROUGE-L, CIDEr, all ×100; SPICE only when its Stanford CoreNLP models are present;
- :func:`retrieval_recall` and :func:`itm_rerank` (:mod:`tasks.retrieval`): R@1/5/10 both ways from
  a similarity matrix (identical texts of different images counted as one when the texts are
  given), optionally re-ranked by an ITM head on the top-k (BLIP/UniAdapter).

Reference rules — not the official metrics, the rules the published CLIP-BART numbers (VL-Adapter,
VL-PET, …) were computed with, recorded beside the official headline (``reference.vladapter``):

- :func:`vqa_accuracy_vladapter` (:mod:`tasks.vqa`): VL-Adapter's ``VQAEvaluator.evaluate_raw``
  (the prediction normalised, the ten answers by punctuation only);
- :func:`gqa_accuracy_vladapter` (:mod:`tasks.gqa`): VL-Adapter's ``GQAEvaluator.evaluate``
  (verbatim); NLVR² and COCO captions are scored there as here: no reference rule.

A task file owns its metric, so this module only gathers the names users and scripts know (the
task files themselves use the task-free pieces of :mod:`evaluation.scoring`, which imports nothing
of the project).

Example:
    >>> from evaluation.metrics import vqa_accuracy
"""

from __future__ import annotations

from evaluation.scoring import exact_match_accuracy
from tasks.caption import caption_scores
from tasks.gqa import gqa_accuracy_vladapter
from tasks.nlvr2 import nlvr2_scores
from tasks.retrieval import itm_rerank, retrieval_recall
from tasks.vqa import vqa_accuracy, vqa_accuracy_vladapter

__all__ = [
    "caption_scores",
    "exact_match_accuracy",
    "gqa_accuracy_vladapter",
    "itm_rerank",
    "nlvr2_scores",
    "retrieval_recall",
    "vqa_accuracy",
    "vqa_accuracy_vladapter",
]
