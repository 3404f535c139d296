"""GQA (Hudson & Manning 2019), balanced question files.

``<root>/<split>_balanced_questions.json`` → ``{question_id: {"imageId", "question", "answer",
"fullAnswer", "types", …}}`` (``<split>``: train, val, testdev, test — whose questions have no
answers: its submission goes to the evaluation server); images ``<images>/<imageId>.jpg``.
Accuracy is exact match (:func:`evaluation.scoring.exact_match_accuracy`); papers report
testdev_balanced. Submission ``[{"questionId", "prediction"}]``; baseline: the most frequent
training answer. A classifier family trains on the answer as a one-hot soft score. Beside the
official score, the score by VL-Adapter's evaluator's rule (:func:`gqa_accuracy_vladapter`:
verbatim, which the published CLIP-BART numbers used) is recorded as ``reference.vladapter``.
"""

from __future__ import annotations

import random

from evaluation.scoring import exact_match_accuracy, verbatim_accuracy

from .base import DataError, Task, field, read_json, register_task
from .synthetic import COLUMNS, Writer, write_json


def gqa_accuracy_vladapter(predictions: dict, answers: dict) -> float:
    """GQA accuracy by VL-Adapter's rule, 0–100: the prediction must equal the answer verbatim
    (no stripping, no case folding; :func:`evaluation.scoring.verbatim_accuracy`).

    ylsung/VL_adapter ``VL-T5/src/gqa_clip_data.py`` (also ``gqa_data.py``; VL-PET's
    ``src/gqa_clip_data.py`` is the same), ``GQAEvaluator.evaluate``: ``score += label[ans] if ans
    in label`` over the generated strings, divided by their number, where ``label`` is LXMERT's
    preprocessed ``{answer: 1.0}``; ``multitask.py`` logs it ×100 on testdev (GQA/Valid/Acc, the
    best epoch's is reported). Ours (:func:`evaluation.scoring.exact_match_accuracy`) strips and
    lower-cases both sides: " yes" or "Yes" against "yes" scores there, not here.

    Args:
        predictions: question id → the predicted answer (a string).
        answers: question id → the right answer; the same ids.
    """
    return verbatim_accuracy(predictions, answers)


# -- the synthetic set (tasks.synthetic calls this writer) -----------------------------------------
def gqa_questions(scene: list[dict], rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, answer, fullAnswer) about relations between shapes."""
    out = []
    for left, right in zip(scene, scene[1:]):
        out.append(
            (
                f"what color is the shape to the left of the {right['shape']}?",
                left["colour"],
                f"the {left['shape']} is {left['colour']}.",
            )
        )
        bigger = "yes" if left["size"] == "large" and right["size"] == "small" else "no"
        out.append(
            (
                f"is the {left['shape']} bigger than the {right['shape']}?",
                bigger,
                f"{bigger}, the {left['shape']} is {'bigger' if bigger == 'yes' else 'not bigger'}.",
            )
        )
    obj = scene[-1]
    out.append(
        (
            f"what shape is on the {COLUMNS[obj['column']]}?",
            obj["shape"],
            f"it is a {obj['shape']}.",
        )
    )
    return out


class SyntheticGQA(Writer):
    """Balanced-question files for the scenes (relations between shapes) and a copy of each image
    under ``gqa/images/<imageId>.jpg``; the Karpathy test split is GQA's testdev."""

    order = 1
    entry = {
        "reader": "gqa",
        "root": "gqa",
        "images": "gqa/images",
        "splits": {"train": "train", "val": "val", "test": "testdev"},
    }
    split_of = {"train": "train", "restval": "train", "val": "val", "test": "testdev"}

    def scene(self, image_id, scene, split, picture) -> None:
        (self.data.out / "gqa" / "images").mkdir(parents=True, exist_ok=True)
        picture.save(self.data.out / "gqa" / "images" / f"{image_id}.jpg", quality=95)

    def finish(self) -> dict[str, int]:
        gqa: dict[str, dict] = {"train": {}, "val": {}, "testdev": {}}
        for image_id, (scene, split) in enumerate(zip(self.data.scenes, self.data.splits), 1):
            for j, (q, a, full) in enumerate(gqa_questions(scene, self.data.rng)):
                gqa[self.split_of[split]][f"{image_id}{j:02d}"] = {
                    "imageId": str(image_id),
                    "question": q,
                    "answer": a,
                    "fullAnswer": full,
                    "isBalanced": True,
                    "types": {"structural": "query", "semantic": "rel", "detailed": "relation"},
                }
        for name, questions in gqa.items():
            write_json(self.data.out / "gqa" / f"{name}_balanced_questions.json", questions)
        return {"gqa_questions": sum(map(len, gqa.values()))}


@register_task("gqa")
class GQA(Task):
    needs = "answer"
    predicts = "generate"
    default_prompt = "gqa:"
    synthetic_writer = SyntheticGQA
    annotation_key = "target"  # the test split's questions come without answers

    def read_split(self, split: str) -> list[dict]:
        path = self.root / f"{split}_balanced_questions.json"
        data = read_json(path)
        if not isinstance(data, dict):
            raise DataError(
                f"{path}: expected an object {{question_id: question}}, got {type(data).__name__}"
            )
        records = []
        for qid, q in data.items():
            where = f"{path}: question {qid!r}"
            image = field(q, "imageId", where, str)
            record = {
                "id": qid,
                "question": field(q, "question", where, str),
                "full_answer": q.get("fullAnswer", ""),
                "types": q.get("types", {}),
                "images": [self.image_root / f"{image}.jpg"],
                "source": str(path),
            }
            if "answer" in q:  # the test split's questions come without (server: submission)
                record["target"] = field(q, "answer", where, str)
            records.append(record)
        return records

    def collate(self, records, images):
        return {
            "kind": "vqa",
            "images": images,
            "text": [self.text(r["question"]) for r in records],
            "targets": [r.get("target", "") for r in records],
            "answer_scores": [{r["target"]: 1.0} if "target" in r else {} for r in records],
            "ids": [r["id"] for r in records],
        }

    def submission(self, records, predictions):
        return [{"questionId": r["id"], "prediction": a} for r, a in zip(records, predictions)]

    def score(self, records, predictions):
        accuracy = exact_match_accuracy(
            {r["id"]: a for r, a in zip(records, predictions)},
            {r["id"]: r["target"] for r in records},
        )
        return {"accuracy": accuracy}, accuracy

    def reference_scores(self, records, predictions):
        """VL-Adapter's evaluator's accuracy (:func:`gqa_accuracy_vladapter`: verbatim)."""
        accuracy = gqa_accuracy_vladapter(
            {r["id"]: a for r, a in zip(records, predictions)},
            {r["id"]: r["target"] for r in records},
        )
        return {"vladapter": accuracy}
