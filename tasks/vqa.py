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
accuracy, :func:`vqa_accuracy` in this file (overall, per answer type and question type; also
``evaluation.metrics.vqa_accuracy``), exactly as the evaluation server scores the submission
``[{"question_id", "answer"}]``; baseline: the most frequent training answer. Beside the official
score, the score by VL-Adapter's evaluator's rule (:func:`vqa_accuracy_vladapter`, which the
published CLIP-BART numbers used) is recorded as ``reference.vladapter`` (:meth:`VQA.reference_scores`).
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import DataError, Task, field, read_json, recording_sources, register_task
from .records import RecordStore, Subset, cached_read
from .synthetic import COLOURS, COLUMNS, SHAPES, SyntheticSet, Writer, coco_folder, write_json


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


def karpathy_image_ids(path: str | Path, wanted: set[str]) -> set[int]:
    """The COCO ids of the images of a Karpathy ``dataset_coco.json`` in the splits ``wanted``."""
    ids = set()
    for i, image in enumerate(field(read_json(path), "images", str(path), list)):
        where = f"{path}: images[{i}]"
        if field(image, "split", where, str) in wanted:
            ids.add(field(image, "cocoid", where, int))
    return ids


def coco_image(root: Path, split: str, image_id: int) -> Path:
    return root / split / f"COCO_{split}_{image_id:012d}.jpg"


# -- the official metric (GT-Vision-Lab VQA vqaEval.py) --------------------------------------------
# VL-T5/VL-Adapter always normalise the prediction; the official script (since its "Fixed processing
# answers bug" commit) normalises prediction and answers — lower-casing included, inside
# processDigitArticle — only when the ten answers are not all identical, and otherwise compares the
# stripped prediction verbatim: "No" against ten "no" scores 0, as on the evaluation server. We
# follow the official script.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]  # fmt: skip
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, verbatim in effect
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def vqa_punctuation(text: str) -> str:
    """The official ``processPunctuation``: a punctuation mark touching a space (or any text with a
    digit,digit comma) is removed, otherwise replaced by a space; then periods not followed by a
    digit are removed (the official call passes re.UNICODE as ``count``, i.e. at most 32)."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def vqa_digits_articles(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words → digits, drop articles,
    restore contractions."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_normalize(text: str) -> str:
    return vqa_digits_articles(vqa_punctuation(text))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the 10 leave-one-out subsets of min(1, #subset answers equal to prediction / 3).

    As the official script: answers and prediction are stripped of newlines, tabs and surrounding
    spaces; only when the answers are not all identical are both normalised (punctuation, then
    lower-case, number words, articles, contractions); otherwise the comparison is verbatim.
    """
    answers = [_clean(a) for a in answers]
    prediction = _clean(prediction)
    if len(set(answers)) > 1:  # the official condition: normalise only when annotators disagree
        answers = [vqa_normalize(a) for a in answers]
        prediction = vqa_normalize(prediction)
    return leave_one_out(prediction, answers)


def leave_one_out(prediction: str, answers: Sequence[str]) -> float:
    """The official rule on normalised strings: the mean over the leave-one-out subsets of the
    answers of min(1, #subset answers equal to the prediction / 3)."""
    matches = [a == prediction for a in answers]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(answers)


def vqa_accuracy(predictions: list[dict], annotations: list[dict]) -> dict:
    """Official VQA accuracy (0–100, two decimals like the official tool).

    Args:
        predictions: ``[{"question_id", "answer"}]`` (the submission format).
        annotations: the official annotation records (``question_id``, ``answers`` [10 ×
            {"answer"}], ``answer_type``, ``question_type``), one per predicted question.

    Returns:
        ``{"overall", "perAnswerType": {type: acc}, "perQuestionType": {type: acc},
        "perQuestion": {question_id: acc}}`` — the official ``accuracy`` and ``evalQA``.

    Example:
        >>> ten = [{"answer": "yes"}] * 10
        >>> vqa_accuracy([{"question_id": 1, "answer": "yes"}], [{"question_id": 1,
        ...     "answers": ten, "answer_type": "yes/no", "question_type": "is there"}])["overall"]
        100.0
    """
    return _vqa_scores(predictions, annotations, vqa_question_accuracy, "vqa_accuracy")


def _vqa_scores(predictions: list[dict], annotations: list[dict], rule, name: str) -> dict:
    """Checks that predictions and annotations cover the same questions once each, then the
    official aggregation of ``rule(prediction, answers)`` (overall, per answer and question type,
    per question; ×100, two decimals)."""
    predicted: dict = {}
    for p in predictions:
        if p["question_id"] in predicted:
            raise ValueError(f"{name}: two predictions for question_id {p['question_id']}")
        if not isinstance(p["answer"], str):
            raise ValueError(
                f"{name}: the answer of question_id {p['question_id']} is "
                f"{type(p['answer']).__name__}, not a string"
            )
        predicted[p["question_id"]] = p["answer"]
    annotated: set = set()
    for a in annotations:
        if a["question_id"] in annotated:
            raise ValueError(f"{name}: two annotations for question_id {a['question_id']}")
        annotated.add(a["question_id"])
    if set(predicted) != annotated:
        missing, extra = sorted(annotated - set(predicted)), sorted(set(predicted) - annotated)
        raise ValueError(
            f"{name}: predictions and annotations differ (missing {missing[:5]}, extra {extra[:5]})"
        )
    if not annotations:
        raise ValueError(f"{name}: no questions to score")
    per_answer, per_question, overall = defaultdict(list), defaultdict(list), []
    each = {}
    for ann in annotations:
        acc = rule(predicted[ann["question_id"]], [a["answer"] for a in ann["answers"]])
        each[ann["question_id"]] = round(100 * acc, 2)
        overall.append(acc)
        per_answer[ann["answer_type"]].append(acc)
        per_question[ann["question_type"]].append(acc)

    def pct(values):
        return round(100 * sum(values) / len(values), 2)

    return {
        "overall": pct(overall),
        "perAnswerType": {k: pct(v) for k, v in sorted(per_answer.items())},
        "perQuestionType": {k: pct(v) for k, v in sorted(per_question.items())},
        "perQuestion": each,
    }


# -- VL-Adapter's rule (what the published CLIP-BART VQA numbers were computed with) ---------------
# ylsung/VL_adapter VL-T5/src/vqa_clip_data.py (and vqa_data.py, vqa_raw_data.py; VL-PET's
# src/vqa_clip_data.py is the same), ``VQAEvaluator.evaluate_raw``: the number multitask.py logs as
# VQA/Test/overall on karpathy_test. It always normalises the prediction fully, but the ten answers
# — read raw from the official annotation files — only by ``processPunctuation`` and only when they
# are not all identical: no stripping, no lower case, no number words, no articles, no
# contractions on the answers' side. "two" against ten "two" scores 0 there (the prediction
# became "2"), 100 officially; "two" against {two ×3, three ×7}: 0 there, 90 officially.
def vqa_question_accuracy_vladapter(prediction: str, answers: Sequence[str]) -> float:
    """One question's accuracy by VL-Adapter's rule (``VQAEvaluator.evaluate_raw`` in
    ylsung/VL_adapter ``VL-T5/src/vqa_clip_data.py``), 0–1.

    The prediction: newlines and tabs → spaces, stripped, ``processPunctuation`` then
    ``processDigitArticle`` (lower case, number words, articles, contractions) — always. The
    answers: as the annotation file has them; ``processPunctuation`` only when they are not all
    identical. Then the official leave-one-out mean of min(1, matches among the other 9 / 3).

    Example:
        >>> vqa_question_accuracy_vladapter("two", ["two"] * 3 + ["three"] * 7)
        0.0
        >>> vqa_question_accuracy("two", ["two"] * 3 + ["three"] * 7)
        0.9
    """
    prediction = vqa_normalize(_clean(prediction))
    answers = list(answers)
    if len(set(answers)) > 1:
        answers = [vqa_punctuation(a) for a in answers]
    return leave_one_out(prediction, answers)


def vqa_accuracy_vladapter(predictions: list[dict], annotations: list[dict]) -> dict:
    """VQA accuracy by VL-Adapter's rule (:func:`vqa_question_accuracy_vladapter`), aggregated as
    the official tool (and ``evaluate_raw``) does: the same arguments and result as
    :func:`vqa_accuracy`, 0–100, two decimals. Not the official score: the score the published
    CLIP-BART numbers (VL-Adapter, VL-PET, …) were computed with, to set ours beside them."""
    return _vqa_scores(
        predictions, annotations, vqa_question_accuracy_vladapter, "vqa_accuracy_vladapter"
    )


# -- the synthetic set (tasks.synthetic calls this writer) -----------------------------------------
def answers_with_noise(answer: str, pool: list[str], rng: random.Random) -> list[str]:
    """Ten annotator answers: mostly the right one, up to two others (soft scores get exercised)."""
    noisy = rng.choice([0, 0, 0, 1, 2])
    wrong = [a for a in pool if a != answer] or [answer]
    return [answer] * (10 - noisy) + [rng.choice(wrong) for _ in range(noisy)]


def vqa_questions(scene: list[dict], rng: random.Random) -> list[tuple]:
    """(question, answer, answer_type, question_type, answer pool) — colour, count, yes/no, position."""
    shapes = [o["shape"] for o in scene]
    unique = [o for o in scene if shapes.count(o["shape"]) == 1]
    out = []
    if unique:
        obj = rng.choice(unique)
        shape = obj["shape"]
        colours, where = list(COLOURS), COLUMNS[obj["column"]]
        out.append(
            (f"what color is the {shape}?", obj["colour"], "other", "what color is the", colours)
        )
        out.append((f"where is the {shape}?", where, "other", "where is the", list(COLUMNS)))
    colour = rng.choice(list(COLOURS))
    count = str(sum(o["colour"] == colour for o in scene))
    out.append(
        (f"how many {colour} shapes are there?", count, "number", "how many", ["0", "1", "2", "3"])
    )
    out.append(
        ("how many shapes are there?", str(len(scene)), "number", "how many", ["1", "2", "3"])
    )
    probe = (
        rng.choice(scene)
        if rng.random() < 0.5
        else {"colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES)}
    )
    present = any(o["colour"] == probe["colour"] and o["shape"] == probe["shape"] for o in scene)
    question = f"is there a {probe['colour']} {probe['shape']}?"
    out.append((question, "yes" if present else "no", "yes/no", "is there a", ["yes", "no"]))
    return out


class SyntheticVQA(Writer):
    """VQAv2 question and annotation files for the scenes (train2014 / val2014 as the COCO images);
    ten answers a question, a little annotator noise."""

    order = 0
    entry = {
        "reader": "vqa",
        "root": "vqa",
        "images": "coco/images",
        "splits": {"train": "karpathy_train", "val": "karpathy_val", "test": "karpathy_test"},
        "options": {"karpathy": "coco/dataset_coco.json"},
    }

    def __init__(self, data: SyntheticSet) -> None:
        super().__init__(data)
        self.questions: dict[str, list] = {"train2014": [], "val2014": []}
        self.annotations: dict[str, list] = {"train2014": [], "val2014": []}

    def scene(self, image_id, scene, split, picture) -> None:
        folder = coco_folder(split)
        for j, (q, a, a_type, q_type, pool) in enumerate(vqa_questions(scene, self.data.rng)):
            qid = image_id * 100 + j
            self.questions[folder].append({"image_id": image_id, "question": q, "question_id": qid})
            given = answers_with_noise(a, pool, self.data.rng)
            self.annotations[folder].append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "question_type": q_type,
                    "answer_type": a_type,
                    "multiple_choice_answer": a,
                    "answers": [
                        {"answer": x, "answer_confidence": "yes", "answer_id": k + 1}
                        for k, x in enumerate(given)
                    ],
                }
            )

    def finish(self) -> dict[str, int]:
        info = {"info": {"description": "vlpeft synthetic"}}
        for folder, questions in self.questions.items():
            write_json(
                self.data.out / "vqa" / f"v2_OpenEnded_mscoco_{folder}_questions.json",
                {**info, "task_type": "Open-Ended", "data_type": "mscoco",
                 "data_subtype": folder, "questions": questions},
            )  # fmt: skip
            write_json(
                self.data.out / "vqa" / f"v2_mscoco_{folder}_annotations.json",
                {**info, "data_type": "mscoco", "data_subtype": folder,
                 "annotations": self.annotations[folder]},
            )  # fmt: skip
        return {"vqa_questions": sum(map(len, self.questions.values()))}


@register_task("vqa")
class VQA(Task):
    needs = "answer"
    predicts = "generate"
    default_prompt = "vqa:"
    path_options = ("karpathy",)
    training_options = ("target",)
    synthetic_writer = SyntheticVQA
    annotation_key = "answers"  # test-dev / test-std have questions only: for the server

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

    def cacheable(self, split: str) -> bool:
        """A Karpathy split is not cached as records: it picks from the cached official splits."""
        return not split.startswith("karpathy_")

    def read_karpathy(self, which: str) -> Sequence[dict]:
        """The Karpathy split ``which`` of train2014 + val2014's questions (restval → train): with
        a record cache, the official splits are parsed once for all three Karpathy splits and each
        is a :class:`tasks.records.Subset` of them (its picks cached too); else a list."""
        path = self.config.options.get("karpathy")
        if not path:
            raise DataError(
                f"task {self.name}: split karpathy_{which} needs options.karpathy (a dataset_coco.json)"
            )
        wanted = {"train": {"train", "restval"}, "val": {"val"}, "test": {"test"}}.get(which)
        if wanted is None:
            raise DataError(
                f"task {self.name}: unknown Karpathy split {which!r} (train, val, test)"
            )
        parts = [self.read_cached(split) for split in ("train2014", "val2014")]
        if not all(isinstance(part, RecordStore) for part in parts):  # no record cache
            images = karpathy_image_ids(path, wanted)
            return [r for part in parts for r in part if r["image_id"] in images]
        identity = {"reader": "vqa-karpathy", "version": self.reader_version, "split": which,
                    "karpathy": str(path), "parts": [str(part.directory) for part in parts]}  # fmt: skip

        def read() -> tuple[list[dict], list[Path]]:
            with recording_sources() as sources:
                images = np.fromiter(karpathy_image_ids(path, wanted), dtype=np.int64)
            picks = [
                {"part": k, "index": int(i)}
                for k, part in enumerate(parts)
                if len(part)  # (an empty official split has no columns)
                for i in np.flatnonzero(np.isin(part.column("image_id"), images))
            ]
            return picks, [*sources, *(s for part in parts for s in part.sources())]

        picks = cached_read(self.cache_dir, identity, read)
        return Subset(parts, picks) if len(picks) else []

    def collate(self, records, images):
        return {
            "kind": "vqa",
            "images": images,
            "text": [self.text(r["question"]) for r in records],
            "targets": [r.get("target", "") for r in records],
            "answer_scores": [r.get("label", {}) for r in records],
            "ids": [r["id"] for r in records],
        }

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

    TARGETS = ("most_common", "sampled")

    def __init__(self, config) -> None:
        super().__init__(config)
        target = config.options.get("target", "most_common")
        if target not in self.TARGETS:
            raise DataError(
                f"task {self.name}: options.target: expected one of {list(self.TARGETS)}, "
                f"got {target!r}"
            )

    def training_targets(self, records, draw):
        """``options.target``: ``most_common`` (default) trains on ``multiple_choice_answer``;
        ``sampled`` is VL-Adapter's (``vqa_clip_data.py``, ``__getitem__``; ``VLBartVQA``): an
        answer of the record's soft scores drawn with probability ∝ its score, its loss weighted
        by that score (no answer: "" with weight 0). VL-Adapter draws from numpy's unseeded
        global state at every fetch; here the draw is a function of (sampler seed, epoch, step,
        question id), so every process and a resumed run draw the same, and a record met twice
        in an epoch (balanced sampling) draws anew. The generation families weight the loss
        (``target_weights``); a classifier (roberta-vit) trains on all soft scores anyway."""
        if self.config.options.get("target", "most_common") == "most_common":
            return None
        targets, weights = [], []
        for record in records:
            label = {a: s for a, s in record.get("label", {}).items() if s > 0}
            if not label:
                targets.append("")
                weights.append(0.0)
                continue
            answers = sorted(label)  # an order independent of how the record was stored
            rng = random.Random(f"vqa-target:{draw}:{record['id']}")
            answer = rng.choices(answers, weights=[label[a] for a in answers])[0]
            targets.append(answer)
            weights.append(float(label[answer]))
        return targets, weights

    def submission(self, records, predictions):
        return [
            {"question_id": r["question_id"], "answer": a} for r, a in zip(records, predictions)
        ]

    def score(self, records, predictions):
        scores = vqa_accuracy(
            self.submission(records, predictions), self.score_annotations(records)
        )
        return scores, scores["overall"]

    def reference_scores(self, records, predictions):
        """VL-Adapter's evaluator's overall accuracy (:func:`vqa_accuracy_vladapter`)."""
        scores = vqa_accuracy_vladapter(
            self.submission(records, predictions), self.score_annotations(records)
        )
        return {"vladapter": scores["overall"]}

    @staticmethod
    def score_annotations(records) -> list[dict]:
        """The official annotation records of ``records`` (what the metrics take)."""
        return [
            {"question_id": r["question_id"], "answers": [{"answer": a} for a in r["answers"]],
             "answer_type": r["answer_type"], "question_type": r["question_type"]}
            for r in records
        ]  # fmt: skip
