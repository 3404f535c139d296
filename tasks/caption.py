"""Image captioning on Karpathy splits (COCO ``dataset_coco.json``, Flickr30k ``dataset_flickr30k.json``).

``{"images": [{"filepath"?, "filename", "cocoid"?, "imgid", "split", "sentences": [{"raw"}]}]}``;
``restval`` counts as train. Training records are (image, sentence) pairs; val/test records are
images with all their reference captions. Images: ``<images>/<filepath>/<filename>`` (Flickr30k
has no filepath). ``options.file`` picks the file (default ``dataset_coco.json``).

Predictions: generated captions, scored by the COCO caption metrics (:func:`caption_scores`:
pycocoevalcap's PTB tokenizer and BLEU-1..4, METEOR, ROUGE-L, CIDEr, all ×100; SPICE only when its
Stanford CoreNLP models are present; CIDEr the headline);
submission ``[{"image_id", "caption"}]``; baseline: the most frequent training caption.
VL-Adapter's evaluator (ylsung/VL_adapter ``VL-T5/src/caption_clip_data.py``,
``COCOCaptionEvaluator``: bckim92/language-evaluation's ``CocoEvaluator``, whose pycocoevalcap copy
has the same PTB tokenizer, BLEU, METEOR, ROUGE-L and CIDEr(-D) code; one prediction per test image
against its stripped raw Karpathy captions) scores as :func:`caption_scores` does, as fractions
(papers print ×100) and with SPICE always: no reference score is recorded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from .base import DataError, Task, field, read_json, register_task
from .synthetic import Writer

log = logging.getLogger(__name__)

SPLITS = {"train": {"train", "restval"}, "val": {"val"}, "test": {"test"}}


def karpathy_images(task: Task, split: str) -> list[dict]:
    """Image records of a Karpathy split with their raw captions (shared with retrieval)."""
    if split not in SPLITS:
        raise DataError(
            f"task {task.name}: unknown Karpathy split {split!r}; valid: {sorted(SPLITS)}"
        )
    path = task.root / task.config.options.get("file", "dataset_coco.json")
    images = []
    for i, image in enumerate(field(read_json(path), "images", str(path), list)):
        where = f"{path}: images[{i}]"
        if field(image, "split", where, str) not in SPLITS[split]:
            continue
        sentences = field(image, "sentences", where, list)
        captions = [
            field(s, "raw", f"{where}: sentences[{j}]", str).strip()
            for j, s in enumerate(sentences)
        ]
        if not captions:
            raise DataError(f"{where}: field 'sentences' is empty")
        # one rule with the VQA reader: cocoid (COCO) or imgid (Flickr30k) is an integer
        image_id = field(image, "cocoid" if "cocoid" in image else "imgid", where, int)
        folder = task.image_root / image.get("filepath", "")
        images.append(
            {
                "id": image_id,
                "image_id": image_id,
                "captions": captions,
                "images": [folder / field(image, "filename", where, str)],
                "source": str(path),
            }
        )
    return images


def karpathy_records(task: Task, split: str) -> list[dict]:
    """Train: one record per (image, caption) pair; val/test: one per image with all captions."""
    images = karpathy_images(task, split)
    if split != "train":
        return images
    return [
        {**im, "id": f"{im['id']}-{j}", "caption": c}
        for im in images
        for j, c in enumerate(im["captions"])
    ]


# -- the COCO caption metrics (pycocoevalcap) ------------------------------------------------------
# every character str.splitlines breaks at: pycocoevalcap's PTB tokenizer writes one caption a line
# for Java and replaces only "\n", while Java also ends lines at "\r", U+2028, U+2029, \v, \f, …:
# one such character in one caption shifted every later caption onto the wrong image
LINE_BREAKS = re.compile(r"[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def one_line(caption: str) -> str:
    """``caption`` with every line separator a space (what the PTB tokenizer can take)."""
    return LINE_BREAKS.sub(" ", caption)


def spice_available() -> bool:
    """SPICE needs Stanford CoreNLP jars in pycocoevalcap's spice/lib (it would download them)."""
    from pycocoevalcap.spice import spice

    lib = Path(spice.__file__).parent / "lib"
    return any(lib.glob("stanford-corenlp-*-models.jar"))


def caption_scores(
    predictions: dict, references: dict, spice: bool | None = None
) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when available), all ×100.

    Args:
        predictions: image id → generated caption.
        references: image id → list of reference captions.
        spice: ``None`` = when its models are present; ``True`` insists (an error without them).

    Line separators inside a caption (``\\r``, U+2028, …) count as spaces: the tokenizer reads one
    caption per line.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if set(predictions) != set(references):
        raise ValueError("caption_scores: predictions and references cover different images")
    bad = [k for k, c in predictions.items() if not isinstance(c, str)]
    if bad:
        raise ValueError(f"caption_scores: the caption of image {bad[0]!r} is not a string")
    bad = [k for k, refs in references.items() if not all(isinstance(c, str) for c in refs)]
    if bad:
        raise ValueError(f"caption_scores: a reference of image {bad[0]!r} is not a string")
    tokenizer = PTBTokenizer()
    with _quiet():  # pycocoevalcap prints its own progress lines: the output stays ours
        gts = tokenizer.tokenize(
            {k: [{"caption": one_line(c)} for c in refs] for k, refs in references.items()}
        )
        res = tokenizer.tokenize({k: [{"caption": one_line(c)}] for k, c in predictions.items()})
    scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor(), ["METEOR"]),
               (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]  # fmt: skip
    if spice is None:
        spice = spice_available()
        if not spice:
            log.info(
                "SPICE skipped: Stanford CoreNLP models are not installed (it cannot download offline)"
            )
    if spice:
        from pycocoevalcap.spice.spice import Spice

        scorers.append((Spice(), ["SPICE"]))
    scores = {}
    for scorer, names in scorers:
        with _quiet():
            value, _ = scorer.compute_score(gts, res)
        for name, v in zip(names, value if isinstance(value, list) else [value]):
            scores[name] = 100 * float(v)
    return scores


@contextlib.contextmanager
def _quiet():
    """Keeps what a scorer prints to stdout and stderr — from Python or from the Java processes it
    starts (file descriptors 1 and 2 point at a temporary file for the duration) — out of our
    output; when the scorer fails, what it printed is logged with the error."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(sink):
                yield
        except BaseException:
            sink.flush()
            sink.seek(0)
            log.error("caption scorer output:\n%s", sink.read()[-4000:])
            raise
        finally:
            sys.stdout.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


class SyntheticCaption(Writer):
    """Reads the synthetic set's shared Karpathy file (``coco/dataset_coco.json``, 5 captions an
    image, written by :func:`tasks.synthetic.generate`): no files of its own."""

    order = 3
    entry = {"reader": "caption", "root": "coco", "images": "coco/images"}


@register_task("caption")
class Caption(Task):
    needs = "caption"
    predicts = "generate"
    default_prompt = "caption:"
    metric = "CIDEr"
    synthetic_writer = SyntheticCaption

    def read_split(self, split: str) -> list[dict]:
        return karpathy_records(self, split)

    def collate(self, records, images):
        return {
            "kind": "caption",
            "images": images,
            "text": [self.prompt] * len(records),
            "targets": [r.get("caption", r["captions"][0]) for r in records],
            "ids": [r["image_id"] for r in records],
        }

    def input_texts(self, record):
        return list(record["captions"])  # targets, taken as they are

    def answers(self, records):
        return [c for r in records for c in r["captions"]]

    def submission(self, records, predictions):
        return [{"image_id": r["image_id"], "caption": c} for r, c in zip(records, predictions)]

    def score(self, records, predictions):
        scores = caption_scores(
            {r["image_id"]: c for r, c in zip(records, predictions)},
            {r["image_id"]: r["captions"] for r in records},
        )
        return scores, scores["CIDEr"]
