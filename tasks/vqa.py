"""VQAv2 (Goyal et al. 2017): the official question/annotation files, answer vocabulary, soft scores.

Files under ``root``: ``v2_OpenEnded_mscoco_<split>_questions.json`` and
``v2_mscoco_<split>_annotations.json`` (``<split>``: train2014, val2014; test splits have questions
only). Images: ``<images>/<split>/COCO_<split>_<image_id:012d>.jpg``.

test-dev2015 / test2015 (questions only, images in ``<images>/test2015/``) are predicted and written
as the submission file ``[{"question_id", "answer"}]`` the evaluation server takes (there is nothing
to score locally).

Karpathy-style splits as used by VL-T5/VL-Adapter: with ``options.karpathy`` naming a
``dataset_coco.json``, the split names ``karpathy_train`` / ``karpathy_val`` / ``karpathy_test``
take the questions of train2014 + val2014 whose image lies in that Karpathy split (restval counts
as train).

Soft target scores: an answer given by k of the 10 annotators scores the mean over the 10
leave-one-out subsets of min(1, matches / 3) — 0, .3, .6, .9, 1 for k = 0, 1, 2, 3, ≥ 4.

Predictions: generated answers (a classifier family's top answer), lower-cased as the annotations
are (the official metric compares a prediction verbatim, case included, with ten identical
answers: a cased tokenizer's "No" would score 0 against ten "no"); scored by the official VQA
accuracy (:func:`evaluation.metrics.vqa_accuracy`: overall, per answer type and question type),
exactly as the evaluation server scores the submission ``[{"question_id", "answer"}]``; baseline:
the most frequent training answer.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from evaluation import metrics

from .base import DataError, Task, field, read_json, register_task


def soft_score(matches: int, total: int = 10) -> float:
    """Leave-one-out VQA score of an answer given by ``matches`` of ``total`` annotators."""
    if total < 2:
        return float(matches > 0)
    with_it = matches * min(1.0, (matches - 1) / 3)  # subsets that leave out a matching answer
    without = (total - matches) * min(1.0, matches / 3)
    return round((with_it + without) / total, 4)


def answer_scores(answers: list[str]) -> dict[str, float]:
    counts = Counter(a.strip().lower() for a in answers)
    return {a: soft_score(k, len(answers)) for a, k in counts.items()}


def most_frequent_answers(answers: list[str], size: int = 3129) -> list[str]:
    """The ``size`` most frequent of ``answers`` (ties broken by name): a classifier's vocabulary."""
    counts = Counter(a for a in answers if a)
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


def image_split(split: str) -> str:
    """The COCO image folder of a question split: test-dev2015 asks about test2015 images."""
    return "test2015" if split.startswith("test-dev") else split


def coco_image(root: Path, split: str, image_id: int) -> Path:
    return root / split / f"COCO_{split}_{image_id:012d}.jpg"


@register_task("vqa")
class VQA(Task):
    needs = "answer"
    predicts = "generate"
    default_prompt = "vqa:"
    path_options = ("karpathy",)

    def read_split(self, split: str) -> list[dict]:
        if split.startswith("karpathy_"):
            return self.read_karpathy(split.removeprefix("karpathy_"))
        return self.read_official(split)

    def read_official(self, split: str) -> list[dict]:
        q_path = self.root / f"v2_OpenEnded_mscoco_{split}_questions.json"
        a_path = self.root / f"v2_mscoco_{split}_annotations.json"
        questions = field(read_json(q_path), "questions", str(q_path), list)
        annotations = {}
        if a_path.exists() or "test" not in split:
            for i, ann in enumerate(field(read_json(a_path), "annotations", str(a_path), list)):
                qid = field(ann, "question_id", f"{a_path}: annotations[{i}]", int)
                if qid in annotations:
                    raise DataError(
                        f"{a_path}: annotations[{i}]: a second annotation for question_id {qid}"
                    )
                annotations[qid] = ann
        records, seen = [], set()
        for i, q in enumerate(questions):
            where = f"{q_path}: questions[{i}]"
            qid = field(q, "question_id", where, int)
            if qid in seen:
                raise DataError(f"{where}: duplicate question_id {qid}")
            seen.add(qid)
            image_id = field(q, "image_id", where, int)
            record = {
                "id": qid,
                "question_id": qid,
                "image_id": image_id,
                "question": field(q, "question", where, str),
                "images": [coco_image(self.image_root, image_split(split), image_id)],
                "source": str(q_path),
            }
            if annotations:
                if qid not in annotations:
                    raise DataError(f"{a_path}: no annotation for question_id {qid} of {where}")
                record.update(
                    self.annotation(
                        annotations[qid], f"{a_path}: question_id {qid}",
                        self.config.options.get("allow_fewer_answers", False),
                    )
                )  # fmt: skip
            records.append(record)
        return records

    @staticmethod
    def annotation(ann: dict, where: str, allow_fewer: bool = False) -> dict:
        answers = [
            field(a, "answer", f"{where}: answers[{j}]", str)
            for j, a in enumerate(field(ann, "answers", where, list))
        ]
        if not answers:
            raise DataError(f"{where}: field 'answers' is empty")
        if len(answers) != 10 and not allow_fewer:
            raise DataError(
                f"{where}: {len(answers)} answers, the official metric assumes 10 "
                "(options.allow_fewer_answers: true to accept)"
            )
        return {
            "answers": answers,
            "answer_type": field(ann, "answer_type", where, str),
            "question_type": field(ann, "question_type", where, str),
            "target": field(ann, "multiple_choice_answer", where, str),
            "label": answer_scores(answers),
        }

    def read_karpathy(self, which: str) -> list[dict]:
        path = self.config.options.get("karpathy")
        if not path:
            raise DataError(
                f"task {self.name}: split karpathy_{which} needs options.karpathy (a dataset_coco.json)"
            )
        karpathy = read_json(path)
        wanted = {"train": {"train", "restval"}, "val": {"val"}, "test": {"test"}}.get(which)
        if wanted is None:
            raise DataError(
                f"task {self.name}: unknown Karpathy split {which!r} (train, val, test)"
            )
        images = set()
        for i, image in enumerate(field(karpathy, "images", str(path), list)):
            where = f"{path}: images[{i}]"
            if field(image, "split", where, str) in wanted:
                images.add(field(image, "cocoid", where, int))
        return [
            r
            for split in ("train2014", "val2014")
            for r in self.read_official(split)
            if r["image_id"] in images
        ]

    def collate(self, records, images):
        return {
            "kind": "vqa",
            "images": images,
            "text": [self.text(r["question"]) for r in records],
            "targets": [r.get("target", "") for r in records],
            "answer_scores": [r.get("label", {}) for r in records],
            "ids": [r["id"] for r in records],
        }

    def annotated(self, record) -> bool:
        """test-dev / test-std have questions only: their predictions go to the server."""
        return "answers" in record

    def submission_name(self, split: str) -> str:
        """The VQA evaluation server's name for a results file of an unannotated split
        (``vqa_OpenEnded_mscoco_test-dev2015_<alg>_results.json``)."""
        official = self.split_name(split)
        if official.startswith(("test-dev", "test2015", "test-std")):
            # <alg>: the task's name beside vlpeft, so two VQA tasks of a run never share a file
            alg = "vlpeft" if self.config_name == "vqa" else f"vlpeft-{self.config_name}"
            return f"vqa_OpenEnded_mscoco_{official}_{alg}_results.json"
        return super().submission_name(split)

    def predict(self, model, records, batches, settings):
        """Generated answers, lower-cased as the annotations are (see the module docstring)."""
        return [answer.lower() for answer in super().predict(model, records, batches, settings)]

    def submission(self, records, predictions):
        return [
            {"question_id": r["question_id"], "answer": a} for r, a in zip(records, predictions)
        ]

    def score(self, records, predictions):
        annotations = [
            {"question_id": r["question_id"], "answers": [{"answer": a} for a in r["answers"]],
             "answer_type": r["answer_type"], "question_type": r["question_type"]}
            for r in records
        ]  # fmt: skip
        scores = metrics.vqa_accuracy(self.submission(records, predictions), annotations)
        return scores, scores["overall"]
