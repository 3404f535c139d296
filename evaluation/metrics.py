"""Official metrics as pure functions (this module imports nothing of the project).

- :func:`vqa_accuracy`: the official VQA evaluation (answer normalisation in the official order and
  conditions; leave-one-out accuracy over the 10 answers; overall, per answer type and per question
  type, 0–100). VL-T5/VL-Adapter always normalise the prediction; the official script
  (GT-Vision-Lab/VQA ``vqaEval.py``, since its "Fixed processing answers bug" commit) normalises
  prediction and answers — lower-casing included, inside ``processDigitArticle`` — only when the
  ten answers are not all identical, and otherwise compares the stripped prediction verbatim:
  "No" against ten "no" scores 0, as on the evaluation server. We follow the official script.
- :func:`exact_match_accuracy` (GQA), :func:`nlvr2_scores` (accuracy and consistency).
- :func:`caption_scores`: pycocoevalcap's PTB tokenizer and BLEU-1..4, METEOR, ROUGE-L, CIDEr, all
  ×100; SPICE only when its Stanford CoreNLP models are present.
- :func:`retrieval_recall` and :func:`itm_rerank`: R@1/5/10 both ways from a similarity matrix,
  optionally re-ranked by an ITM head on the top-k (BLIP/UniAdapter).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# -- VQA normalisation, as in the official vqaEval.py ---------------------------------------------
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
_PUNCT = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
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
    """
    predicted: dict = {}
    for p in predictions:
        if p["question_id"] in predicted:
            raise ValueError(f"vqa_accuracy: two predictions for question_id {p['question_id']}")
        if not isinstance(p["answer"], str):
            raise ValueError(
                f"vqa_accuracy: the answer of question_id {p['question_id']} is "
                f"{type(p['answer']).__name__}, not a string"
            )
        predicted[p["question_id"]] = p["answer"]
    annotated: set = set()
    for a in annotations:
        if a["question_id"] in annotated:
            raise ValueError(f"vqa_accuracy: two annotations for question_id {a['question_id']}")
        annotated.add(a["question_id"])
    if set(predicted) != annotated:
        missing, extra = sorted(annotated - set(predicted)), sorted(set(predicted) - annotated)
        raise ValueError(
            f"vqa_accuracy: predictions and annotations differ (missing {missing[:5]}, extra {extra[:5]})"
        )
    if not annotations:
        raise ValueError("vqa_accuracy: no questions to score")
    per_answer, per_question, overall = defaultdict(list), defaultdict(list), []
    each = {}
    for ann in annotations:
        acc = vqa_question_accuracy(
            predicted[ann["question_id"]], [a["answer"] for a in ann["answers"]]
        )
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


def exact_match_accuracy(predictions: dict, answers: dict) -> float:
    """GQA accuracy: % of questions whose stripped, lower-cased prediction equals the answer."""
    if set(predictions) != set(answers):
        raise ValueError("exact_match_accuracy: predictions and answers cover different questions")
    if not answers:
        raise ValueError("exact_match_accuracy: no questions to score")
    bad = [q for q in answers if not isinstance(predictions[q], str)]
    if bad:
        raise ValueError(
            f"exact_match_accuracy: the prediction of question {bad[0]!r} is not a string"
        )
    hits = sum(predictions[q].strip().lower() == answers[q].strip().lower() for q in answers)
    return 100 * hits / len(answers)


def nlvr2_scores(predictions: dict[str, bool], labels: dict[str, bool]) -> dict:
    """NLVR² accuracy and consistency (% of sentences — identifiers minus the last field — whose
    statements over all their image pairs are all right), 0–100."""
    if set(predictions) != set(labels):
        raise ValueError("nlvr2_scores: predictions and labels cover different identifiers")
    if not labels:
        raise ValueError("nlvr2_scores: no statements to score")
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


# -- captions -------------------------------------------------------------------------------------
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
    tokenizer = PTBTokenizer()
    with _quiet():  # pycocoevalcap prints its own progress lines: the output stays ours
        gts = tokenizer.tokenize(
            {k: [{"caption": c} for c in refs] for k, refs in references.items()}
        )
        res = tokenizer.tokenize({k: [{"caption": c}] for k, c in predictions.items()})
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


# -- retrieval ------------------------------------------------------------------------------------
def _ranks(scores: np.ndarray, targets: list[np.ndarray]) -> np.ndarray:
    """Rank (0 = first) of the best target of each row: the number of *wrong* candidates scoring
    ≥ the best correct one. Ties with a wrong candidate count against the model (a constant scorer
    gets no credit); ties among an image's own captions do not."""
    ranks = np.empty(len(scores), dtype=int)
    for row, target in enumerate(targets):
        wrong = np.ones(scores.shape[1], dtype=bool)
        wrong[target] = False
        best = scores[row, target].max()
        ranks[row] = int((scores[row, wrong] >= best).sum())
    return ranks


def retrieval_recall(
    similarity, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)
) -> dict:
    """R@K image→text and text→image (0–100) and their means.

    Args:
        similarity: (n_images, n_texts) scores.
        text_to_image: for each text, the index of its image.

    Returns:
        ``{"i2t_r1", …, "t2i_r1", …, "i2t_mean", "t2i_mean", "r_mean"}`` (image→text: a hit when
        the best-ranked of the image's captions is within K).
    """
    sim = np.asarray(similarity, dtype=np.float64)
    owner = np.asarray(text_to_image)
    bad = np.isnan(sim).any(1)
    if bad.any():  # NaN ≥ x is False: NaN scores would rank first and give R@K = 100
        raise ValueError(
            f"retrieval_recall: {int(bad.sum())} of {len(sim)} image rows have NaN similarities "
            "(a diverged model?); ±inf are scores, NaN is not"
        )
    if sim.shape[1] != len(owner):
        raise ValueError(
            f"retrieval_recall: {sim.shape[1]} texts but {len(owner)} text→image entries"
        )
    i2t = _ranks(sim, [np.flatnonzero(owner == i) for i in range(sim.shape[0])])
    t2i = _ranks(sim.T, [np.array([i]) for i in owner])
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_r{k}"] = 100 * float((ranks < k).mean())
    return with_recall_means(out, ks)


def with_recall_means(recalls: dict, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Adds ``i2t_mean``, ``t2i_mean`` (over R@ks) and ``r_mean`` (their average) to ``recalls``."""
    for name in ("i2t", "t2i"):
        recalls[f"{name}_mean"] = float(np.mean([recalls[f"{name}_r{k}"] for k in ks]))
    recalls["r_mean"] = (recalls["i2t_mean"] + recalls["t2i_mean"]) / 2
    return recalls


def random_ranking_recall(positives: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Expected recall (in %) of a uniformly random ranking, exactly: ``positives[i]`` = captions of
    image i; t2i R@K = K/N images, i2t R@K = 1 − C(T − n, K) / C(T, K) for an image with n of the T
    captions."""
    images, texts = len(positives), sum(positives)
    scores = {}
    for k in ks:
        kk = min(k, texts)
        scores[f"i2t_r{k}"] = (
            100
            * sum(1 - math.comb(texts - n, kk) / math.comb(texts, kk) for n in positives)
            / images
        )
        scores[f"t2i_r{k}"] = 100 * min(k, images) / images
    return with_recall_means(scores, ks)


def itm_rerank(similarity, itm: Callable[[int, np.ndarray], np.ndarray], k: int) -> np.ndarray:
    """BLIP's re-ranking of one direction: for each row, the top-k columns by similarity get
    ``itm(row, columns) + similarity`` and the rest ``-inf``.

    Call it once per direction (image→text rows = images; text→image on the transposed matrix).
    """
    sim = np.asarray(similarity, dtype=np.float64)
    out = np.full_like(sim, -np.inf)
    k = min(k, sim.shape[1])
    for row in range(sim.shape[0]):
        top = np.argsort(-sim[row], kind="stable")[:k]
        out[row, top] = np.asarray(itm(row, top), dtype=np.float64) + sim[row, top]
    return out
