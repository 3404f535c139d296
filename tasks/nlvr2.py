"""NLVR² (Suhr et al. 2019): a statement about two images, True or False.

``<root>/<split>.json`` is JSON Lines (``train``, ``dev``, ``test1``): ``{"identifier":
"dev-850-0-0", "sentence", "label": "True"|"False", "directory"?}``. The left/right images are
named from the identifier without its last field: ``dev-850-0-img0.png`` / ``-img1.png``, under
``<images>/<split>/`` (plus ``<directory>/`` when the record has one, as train does).
The model predicts by comparing the ``"true"`` and ``"false"`` logits (``score_choices``); scored by
accuracy and consistency (:func:`nlvr2_scores`); the submission is the official CSV
``identifier,True|False``; baseline: the more frequent training label for every statement.
VL-Adapter's evaluator (ylsung/VL_adapter ``VL-T5/src/nlvr_clip_data.py``,
``NLVR2Evaluator.evaluate``, behind the published CLIP-BART numbers) scores as :func:`nlvr2_scores`
does — accuracy over the statements, consistency over identifiers with the pair field blanked
(``<split>-<set>--<sentence>``), from a "true" logit strictly above the "false" one — so no
reference score is recorded.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections import defaultdict

import numpy as np

from .base import DataError, Task, field, most_common, read_jsonl, register_task
from .synthetic import COLOURS, SHAPES, Writer, plural, render

CHOICES = ("true", "false")


def image_names(identifier: str) -> tuple[str, str]:
    stem = identifier.rsplit("-", 1)[0]
    return f"{stem}-img0.png", f"{stem}-img1.png"


def nlvr2_scores(predictions: dict[str, bool], labels: dict[str, bool]) -> dict:
    """NLVR² accuracy and consistency (% of sentences — identifiers minus the last field — whose
    statements over all their image pairs are all right), 0–100.

    Args:
        predictions: identifier → the predicted truth value, a bool (``"True"``/``"False"``
            strings as in the official files are a TypeError: they would never equal a bool).
        labels: identifier → the right truth value, a bool; the same identifiers.
    """
    if set(predictions) != set(labels):
        raise ValueError("nlvr2_scores: predictions and labels cover different identifiers")
    if not labels:
        raise ValueError("nlvr2_scores: no statements to score")
    for what, values in (("prediction", predictions), ("label", labels)):
        bad = next((k for k, v in values.items() if not isinstance(v, (bool, np.bool_))), None)
        if bad is not None:
            raise TypeError(
                f"nlvr2_scores: the {what} of identifier {bad!r} is {values[bad]!r} "
                f"({type(values[bad]).__name__}), expected a bool"
            )
    right = {k: predictions[k] == labels[k] for k in labels}
    groups = defaultdict(list)
    for identifier, ok in right.items():
        parts = identifier.split("-")  # <split>-<set>-<pair>-<sentence>
        if len(parts) < 4:
            raise ValueError(
                f"nlvr2_scores: identifier {identifier!r} is not <split>-<set>-<pair>-<sentence>"
            )
        groups[(parts[0], parts[1], parts[-1])].append(ok)
    return {
        "accuracy": 100 * sum(right.values()) / len(right),
        "consistency": 100 * sum(all(g) for g in groups.values()) / len(groups),
    }


# -- the synthetic set (tasks.synthetic calls this writer) -----------------------------------------
def nlvr_statement(left: list[dict], right: list[dict], truth: bool, rng: random.Random) -> str:
    """A statement about the pair that is ``truth`` (tries templates until one fits)."""
    both = left + right
    for _ in range(50):
        kind = rng.randrange(4)
        if kind == 0:
            shape = rng.choice(SHAPES)
            n = sum(o["shape"] == shape for o in both)
            k = n if truth else rng.choice([m for m in range(1, 7) if m != n])
            return f"there are {k} {plural(shape, k)} in total"
        if kind == 1:
            colour = rng.choice(list(COLOURS))
            if any(o["colour"] == colour for o in left) == truth:
                return f"the left image contains a {colour} shape"
        if kind == 2:
            shape = rng.choice(SHAPES)
            holds = any(o["shape"] == shape for o in left) and any(
                o["shape"] == shape for o in right
            )
            if holds == truth:
                return f"both images contain a {shape}"
        if kind == 3 and len(left) != len(right) and (len(left) > len(right)) == truth:
            return "there are more shapes in the left image than in the right image"
    raise RuntimeError("no statement found")  # unreachable: kind 0 always returns


class SyntheticNLVR2(Writer):
    """JSON Lines statements about pairs of scenes drawn within one split (each pair once True,
    once False) and the pairs' images under ``nlvr2/images/<split>/``."""

    order = 2
    entry = {
        "reader": "nlvr2",
        "root": "nlvr2",
        "images": "nlvr2/images",
        "splits": {"train": "train", "val": "dev", "test": "test1"},
    }
    split_of = {"train": "train", "restval": "train", "val": "dev", "test": "test1"}

    def finish(self) -> dict[str, int]:
        data, rng = self.data, self.data.rng
        rows: dict[str, list] = {"train": [], "dev": [], "test1": []}
        for name in rows:
            pool = [i for i, s in enumerate(data.splits) if self.split_of[s] == name]
            for pair in range(len(pool)):
                a, b = rng.sample(pool, 2)
                stem = f"{name}-{pair}-0"
                folder = data.out / "nlvr2" / "images" / name
                folder.mkdir(parents=True, exist_ok=True)
                render(data.scenes[a], data.size).save(folder / f"{stem}-img0.png")
                render(data.scenes[b], data.size).save(folder / f"{stem}-img1.png")
                for k, truth in enumerate(rng.sample([True, False], 2)):
                    sentence = nlvr_statement(data.scenes[a], data.scenes[b], truth, rng)
                    rows[name].append(
                        {"identifier": f"{stem}-{k}", "sentence": sentence, "label": str(truth),
                         "left_url": "", "right_url": "", "synset": "", "query": ""}
                    )  # fmt: skip
        for name, lines in rows.items():
            path = data.out / "nlvr2" / f"{name}.json"
            path.write_text("".join(json.dumps(r) + "\n" for r in lines))
        return {"nlvr2_statements": sum(map(len, rows.values()))}


@register_task("nlvr2")
class NLVR2(Task):
    needs = "choices"
    predicts = "choices"
    submission_format = "csv"
    default_prompt = "nlvr:"
    choices = CHOICES
    synthetic_writer = SyntheticNLVR2
    annotation_key = "label"  # test2 (hidden) has none
    images_per_record = 2

    def read_split(self, split: str) -> list[dict]:
        path = self.root / f"{split}.json"
        records = []
        for i, row in enumerate(read_jsonl(path)):
            where = f"{path}: line {i + 1}"
            identifier = field(row, "identifier", where, str)
            if identifier.count("-") < 3:
                raise DataError(
                    f"{where}: field 'identifier' {identifier!r} is not <split>-<set>-<pair>-<n>"
                )
            folder = self.image_root / split / str(row.get("directory", ""))
            record = {
                "id": identifier,
                "sentence": field(row, "sentence", where, str),
                "images": [folder / name for name in image_names(identifier)],
                "source": str(path),
            }
            if "label" in row:  # a hidden test split (test2) has none: a submission only
                label = field(row, "label", where, str)
                if label not in ("True", "False"):
                    raise DataError(
                        f'{where}: field \'label\' must be "True" or "False", got {label!r}'
                    )
                record.update(target=label.lower(), label=int(label == "True"))
            records.append(record)
        return records

    def collate(self, records, images):
        return {
            "kind": "nlvr",
            "images": images,
            "text": [self.text(r["sentence"]) for r in records],
            "targets": [r.get("target", "") for r in records],
            "ids": [r["id"] for r in records],
        }

    def input_texts(self, record):
        return [self.text(record["sentence"])]

    def answers(self, records):
        return []  # labels, not answers: a classifier's vocabulary takes none of them

    def predict(self, model, records, batches, settings):
        said: list[bool] = []
        for batch in batches:
            logits = model.score_choices(batch, list(self.choices))
            said += (logits[:, 0] > logits[:, 1]).tolist()  # choices = ("true", "false")
        return said

    def score(self, records, predictions):
        scores = nlvr2_scores(
            {r["id"]: p for r, p in zip(records, predictions)},  # bool(): "False" would be True
            {r["id"]: bool(r["label"]) for r in records},
        )
        return scores, scores["accuracy"]

    def submission(self, records, predictions):
        text = io.StringIO()
        csv.writer(text).writerows([(r["id"], str(bool(p))) for r, p in zip(records, predictions)])
        return text.getvalue()

    def baseline_predictions(self, train, records):
        label = most_common((bool(r["label"]) for r in train), f"task {self.name}: labels")
        return f"always {label}", [label] * len(records)
