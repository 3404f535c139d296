"""GQA (Hudson & Manning 2019), balanced question files.

``<root>/<split>_balanced_questions.json`` → ``{question_id: {"imageId", "question", "answer",
"fullAnswer", "types", …}}`` (``<split>``: train, val, testdev, test — whose questions have no
answers: its submission goes to the evaluation server); images ``<images>/<imageId>.jpg``.
Accuracy is exact match (:func:`evaluation.scoring.exact_match_accuracy`); papers report
testdev_balanced. Submission ``[{"questionId", "prediction"}]``; baseline: the most frequent
training answer. A classifier family trains on the answer as a one-hot soft score.
"""

from __future__ import annotations

from evaluation.scoring import exact_match_accuracy

from .base import DataError, Task, field, read_json, register_task


@register_task("gqa")
class GQA(Task):
    needs = "answer"
    predicts = "generate"
    default_prompt = "gqa:"

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

    def annotated(self, record) -> bool:
        return "target" in record

    def submission(self, records, predictions):
        return [{"questionId": r["id"], "prediction": a} for r, a in zip(records, predictions)]

    def score(self, records, predictions):
        accuracy = exact_match_accuracy(
            {r["id"]: a for r, a in zip(records, predictions)},
            {r["id"]: r["target"] for r in records},
        )
        return {"accuracy": accuracy}, accuracy
