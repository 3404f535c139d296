"""Metrics against hand-worked cases and against pycocoevalcap called directly."""

import random
import shutil
from itertools import permutations, product

import numpy as np
import pytest

from evaluation import metrics, scoring
from evaluation.scoring import exact_match_accuracy, verbatim_accuracy
from tasks.base import TaskConfig, get_task, list_tasks
from tasks.caption import caption_scores
from tasks.gqa import gqa_accuracy_vladapter
from tasks.nlvr2 import nlvr2_scores
from tasks.retrieval import itm_rerank, random_ranking_recall, retrieval_recall
from tasks.vqa import (
    vqa_accuracy,
    vqa_accuracy_vladapter,
    vqa_digits_articles,
    vqa_normalize,
    vqa_punctuation,
    vqa_question_accuracy,
    vqa_question_accuracy_vladapter,
)


def test_each_metric_lives_with_its_task_and_keeps_its_public_name():
    """A task file owns its metric; ``evaluation.metrics`` keeps the names users know (DESIGN,
    README), and ``evaluation.scoring`` — what task files share — names no task."""
    homes = {name: getattr(metrics, name).__module__ for name in metrics.__all__}
    assert homes == {
        "vqa_accuracy": "tasks.vqa",
        "nlvr2_scores": "tasks.nlvr2",
        "caption_scores": "tasks.caption",
        "retrieval_recall": "tasks.retrieval",
        "itm_rerank": "tasks.retrieval",
        "exact_match_accuracy": "evaluation.scoring",
        "vqa_accuracy_vladapter": "tasks.vqa",
        "gqa_accuracy_vladapter": "tasks.gqa",
    }
    assert metrics.vqa_accuracy is vqa_accuracy
    assert not [name for name in vars(scoring) if any(task in name for task in list_tasks())]


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Two", "2"),
        ("2", "2"),
        ("two.", "2"),
        ("a dog", "dog"),
        ("dont", "don't"),
        ("10 o'clock", "10 o'clock"),
        ("10 oclock", "10 o'clock"),
        ("yes!", "yes"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("black-and-white", "black and white"),
        ("the cat's toy", "cat's toy"),
    ],
)
def test_vqa_normalisation_edge_cases(raw, normal):
    assert vqa_normalize(raw) == normal


def test_vqa_normalisation_only_when_annotators_disagree():
    # all ten say "2": no normalisation, so "two." is not "2" (the official condition)
    assert vqa_question_accuracy("two.", ["2"] * 10) == 0.0
    assert vqa_question_accuracy("Two", ["two"] * 10) == 0.0  # verbatim, case included
    assert vqa_question_accuracy("No", ["no"] * 10) == 0.0  # as the evaluation server scores it
    assert vqa_question_accuracy(" no\n", ["no"] * 10) == 1.0  # only whitespace is stripped
    # annotators disagree: both sides are normalised, "two." == "2" == "two"
    answers = ["2"] * 2 + ["two"] * 2 + ["3"] * 6
    assert vqa_question_accuracy("two.", answers) == 1.0


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        # unanimous answers: compared verbatim after stripping, whatever the normalisation would do
        ("Yes", ["yes"] * 10, 0.0),
        ("yes.", ["yes"] * 10, 0.0),
        ("2", ["two"] * 10, 0.0),
        ("\tyes ", ["yes"] * 10, 1.0),
        # mixed answers: both sides normalised, lower-casing included
        ("Yes", ["yes"] * 9 + ["no"], 1.0),
        ("YES!", ["yes"] * 3 + ["no"] * 7, 0.9),
        ("Two", ["2"] * 4 + ["3"] * 6, 1.0),  # number word → digit, case folded
        ("one thousand", ["1,000"] * 5 + ["100"] * 5, 0.0),  # only none/zero…ten are mapped
        ("1,000", ["1000"] * 5 + ["100"] * 5, 1.0),  # digit,digit comma: punctuation removed
        ("3.5", ["3.5"] * 4 + ["3"] * 6, 1.0),  # a period before a digit stays
        ("3 .", ["3"] * 4 + ["2"] * 6, 1.0),  # a period not before a digit goes
        ("a Red apple", ["red apple"] * 4 + ["apple"] * 6, 1.0),  # articles dropped
        ("The dog", ["dog"] * 2 + ["cat"] * 8, 0.6),
        ("dont", ["don't"] * 3 + ["no"] * 7, 0.9),  # contractions restored
        (
            "black-and-white",
            ["black and white"] * 4 + ["gray"] * 6,
            1.0,
        ),  # '-' touching no space: a space
        ("left - right", ["left right"] * 4 + ["up"] * 6, 1.0),  # '-' touching a space: removed
    ],
)
def test_vqa_official_rules_on_hand_worked_cases(prediction, answers, expected):
    """Each case worked by hand from the official vqaEval.py rules (strip; normalise punctuation,
    then digits/articles/case/contractions, only when the ten answers are not unanimous)."""
    assert vqa_question_accuracy(prediction, answers) == pytest.approx(expected)


def test_vqa_leave_one_out_by_hand():
    # the prediction matches 2 of 10 answers: leaving out one of the 2 leaves 1 match (1/3),
    # leaving out one of the other 8 leaves 2 matches (2/3): (2·1/3 + 8·2/3) / 10 = 0.6
    answers = ["red", "red"] + ["blue"] * 8
    assert vqa_question_accuracy("red", answers) == pytest.approx(0.6)
    assert vqa_question_accuracy("blue", answers) == pytest.approx(1.0)
    assert vqa_question_accuracy("green", answers) == 0.0
    three = ["a cat"] * 3 + ["dog"] * 7  # normalised "cat" matches 3: (3·2/3 + 7·1) / 10 = 0.9
    assert vqa_question_accuracy("cat", three) == pytest.approx(0.9)


def test_vqa_accuracy_overall_and_per_type():
    ann = [
        {
            "question_id": 1,
            "answer_type": "number",
            "question_type": "how many",
            "answers": [{"answer": a} for a in ["2"] * 2 + ["two"] * 2 + ["3"] * 6],
        },
        {
            "question_id": 2,
            "answer_type": "yes/no",
            "question_type": "is the",
            "answers": [{"answer": "yes"}] * 10,
        },
        {
            "question_id": 3,
            "answer_type": "yes/no",
            "question_type": "is the",
            "answers": [{"answer": "no"}] * 10,
        },
    ]
    preds = [
        {"question_id": 1, "answer": "3"},
        {"question_id": 2, "answer": "yes"},
        {"question_id": 3, "answer": "yes"},
    ]
    out = vqa_accuracy(preds, ann)
    assert out["overall"] == pytest.approx(round(100 * 2 / 3, 2))
    assert out["perAnswerType"] == {"number": 100.0, "yes/no": 50.0}
    assert out["perQuestionType"]["is the"] == 50.0
    assert out["perQuestion"] == {1: 100.0, 2: 100.0, 3: 0.0}  # the official evalQA
    with pytest.raises(ValueError, match="two predictions for question_id 2"):
        vqa_accuracy([*preds, {"question_id": 2, "answer": "no"}], ann)  # no silent last-wins
    with pytest.raises(ValueError, match="two annotations for question_id 3"):
        vqa_accuracy(preds, [*ann, ann[2]])
    with pytest.raises(ValueError, match="question_id 1 is NoneType"):
        vqa_accuracy([{"question_id": 1, "answer": None}, *preds[1:]], ann)
    with pytest.raises(ValueError, match="missing"):
        vqa_accuracy(preds[:2], ann)


# -- VL-Adapter's rules (the published CLIP-BART numbers), beside the official ones ---------------
# (prediction, the ten answers, official accuracy, VL-Adapter's), each worked by hand: VL-Adapter's
# VQAEvaluator.evaluate_raw normalises the prediction fully, the answers by punctuation only and
# only when they are not all identical (never stripped, lower-cased, digits, articles)
VQA_BOTH_RULES = [
    ("two", ["two"] * 3 + ["three"] * 7, 0.9, 0.0),  # prediction "2", answers stay "two"
    ("two", ["two"] * 10, 1.0, 0.0),  # officially verbatim; there "2" against "two"
    ("yes.", ["yes"] * 10, 0.0, 1.0),  # officially verbatim; there the period goes
    ("No", ["no"] * 10, 0.0, 1.0),  # officially verbatim, case included; there lower-cased
    ("the dog", ["the dog"] * 10, 1.0, 0.0),  # there the article goes from the prediction only
    ("dog", ["a dog"] * 4 + ["cat"] * 6, 1.0, 0.0),  # the answers' article stays there
    ("yes", ["Yes"] * 5 + ["no"] * 5, 1.0, 0.0),  # the answers' case stays there
    ("yes", [" yes"] * 10, 1.0, 0.0),  # the answers are not stripped there
    ("one", ["1"] * 2 + ["one"] * 2 + ["2"] * 6, 1.0, 0.6),  # 4 matches vs 2: (2/3 + 16/3) / 10
    ("2", ["two"] * 8 + ["2"] * 2, 1.0, 0.6),
    ("black and white", ["black-and-white"] * 4 + ["gray"] * 6, 1.0, 1.0),  # punctuation: both
    ("dont", ["don't"] * 3 + ["no"] * 7, 0.9, 0.9),  # "'" is no punctuation mark: both
    ("Yes", ["yes"] * 9 + ["no"], 1.0, 1.0),
    ("red", ["red"] * 10, 1.0, 1.0),
    ("3.5", ["3.5"] * 4 + ["3"] * 6, 1.0, 1.0),  # a period before a digit stays: both
]


@pytest.mark.parametrize(("prediction", "answers", "official", "vladapter"), VQA_BOTH_RULES)
def test_vqa_vladapter_rule_on_hand_worked_cases(prediction, answers, official, vladapter):
    assert vqa_question_accuracy(prediction, answers) == pytest.approx(official)
    assert vqa_question_accuracy_vladapter(prediction, answers) == pytest.approx(vladapter)


def test_vqa_accuracy_vladapter_on_a_hand_worked_set_beside_the_official_one():
    """The fifteen cases above as one split: officially 12.8 / 15 = 85.33, by VL-Adapter's rule
    8.1 / 15 = 54.00; per answer type likewise, the same checks as the official function's."""
    types = ["number", "number", "yes/no", "yes/no", "other", "other", "yes/no", "yes/no",
             "number", "number", "other", "yes/no", "yes/no", "other", "number"]  # fmt: skip
    ann = [
        {"question_id": i, "answers": [{"answer": a} for a in answers], "answer_type": t,
         "question_type": "what"}
        for i, ((_, answers, _, _), t) in enumerate(zip(VQA_BOTH_RULES, types))
    ]  # fmt: skip
    preds = [{"question_id": i, "answer": p} for i, (p, *_) in enumerate(VQA_BOTH_RULES)]
    official, theirs = vqa_accuracy(preds, ann), vqa_accuracy_vladapter(preds, ann)
    assert official["overall"] == 85.33 and theirs["overall"] == 54.0
    # number: cases 0, 1, 8, 9, 14 → (.9 + 1 + 1 + 1 + 1) / 5 and (0 + 0 + .6 + .6 + 1) / 5;
    # other: 4, 5, 10, 13 → 4 / 4 and (0 + 0 + 1 + 1) / 4; yes/no: 2, 3, 6, 7, 11, 12 →
    # (0 + 0 + 1 + 1 + .9 + 1) / 6 and (1 + 1 + 0 + 0 + .9 + 1) / 6: equal, by other questions
    assert official["perAnswerType"] == {"number": 98.0, "other": 100.0, "yes/no": 65.0}
    assert theirs["perAnswerType"] == {"number": 44.0, "other": 50.0, "yes/no": 65.0}
    assert theirs["perQuestion"] == {i: round(100 * c[3], 2) for i, c in enumerate(VQA_BOTH_RULES)}
    with pytest.raises(ValueError, match="vqa_accuracy_vladapter: two predictions"):
        vqa_accuracy_vladapter([*preds, preds[0]], ann)
    with pytest.raises(ValueError, match="vqa_accuracy_vladapter: predictions and annotations"):
        vqa_accuracy_vladapter(preds[1:], ann)


def _evaluate_raw_as_written(prediction: str, answers: list[str]) -> float:
    """VL-Adapter's ``evaluate_raw`` for one question, step by step as it is written: answer
    dicts with their ids, normalised in place, the others of each one found by dict inequality."""
    res = prediction.replace("\n", " ").replace("\t", " ").strip()
    res = vqa_digits_articles(vqa_punctuation(res))
    gts = [
        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)
    ]
    if len({d["answer"] for d in gts}) > 1:
        for d in gts:
            d["answer"] = vqa_punctuation(d["answer"])
    accs = []
    for d in gts:
        others = [o for o in gts if o != d]
        accs.append(min(1, len([o for o in others if o["answer"] == res]) / 3))
    return sum(accs) / len(accs)


TRICKY = ["two", "2", "Two", "a dog", "dog", "yes", "Yes", "yes.", "no", " yes", "black-and-white",
          "black and white", "don't", "dont", "1,000", "1000", "3.5", "the dog", "no!"]  # fmt: skip
NORMAL = ["2", "yes", "no", "dog", "black and white", "don't", "1000", "3.5", "red"]


def test_vqa_vladapter_rule_equals_evaluate_raw_as_written_and_the_official_on_normal_forms():
    """Over seeded random questions of tricky answers: the rule equals ``evaluate_raw`` restated
    literally; where prediction and answers are already in normal form, the two rules agree (they
    differ only in what they normalise)."""
    rng = random.Random(0)
    for _ in range(400):
        pool = rng.sample(TRICKY, rng.randint(1, 3))
        answers = [rng.choice(pool) for _ in range(10)]
        prediction = rng.choice(TRICKY)
        assert vqa_question_accuracy_vladapter(prediction, answers) == pytest.approx(
            _evaluate_raw_as_written(prediction, answers)
        )
    assert all(vqa_normalize(a) == a for a in NORMAL)
    for _ in range(200):
        pool = rng.sample(NORMAL, rng.randint(1, 3))
        answers, prediction = [rng.choice(pool) for _ in range(10)], rng.choice(NORMAL)
        assert vqa_question_accuracy_vladapter(prediction, answers) == pytest.approx(
            vqa_question_accuracy(prediction, answers)
        )


@pytest.mark.parametrize(
    ("prediction", "answer", "official", "vladapter"),
    [("yes", "yes", 100.0, 100.0), ("Yes", "yes", 100.0, 0.0), (" yes", "yes", 100.0, 0.0),
     ("yes ", "yes", 100.0, 0.0), ("no", "yes", 0.0, 0.0), ("red ball", "red ball", 100.0, 100.0)],
)  # fmt: skip
def test_gqa_vladapter_rule_is_verbatim_where_ours_strips_and_folds_case(
    prediction, answer, official, vladapter
):
    assert exact_match_accuracy({"q": prediction}, {"q": answer}) == official
    assert gqa_accuracy_vladapter({"q": prediction}, {"q": answer}) == vladapter
    assert verbatim_accuracy({"q": prediction}, {"q": answer}) == vladapter
    preds = {"a": "Yes", "b": "no", "c": "red", "d": " cat"}
    gold = {"a": "yes", "b": "no", "c": "blue", "d": "cat"}
    assert (exact_match_accuracy(preds, gold), gqa_accuracy_vladapter(preds, gold)) == (75.0, 25.0)
    with pytest.raises(ValueError, match="verbatim_accuracy: predictions and answers cover"):
        gqa_accuracy_vladapter({"a": "x"}, gold)


def test_gqa_and_nlvr2():
    assert exact_match_accuracy({"a": "Cat ", "b": "dog"}, {"a": "cat", "b": "bird"}) == 50.0
    labels = {"dev-1-0-0": True, "dev-1-1-0": False, "dev-1-0-1": True, "dev-2-0-0": False}
    preds = {"dev-1-0-0": True, "dev-1-1-0": False, "dev-1-0-1": False, "dev-2-0-0": False}
    out = nlvr2_scores(preds, labels)
    assert out["accuracy"] == 75.0
    assert out["consistency"] == pytest.approx(100 * 2 / 3)  # sentences (1,0) and (2,0) all right


def test_retrieval_recall_by_hand_with_ties():
    # 2 images, 4 texts: texts 0,1 → image 0; texts 2,3 → image 1
    sim = np.array([[0.9, 0.1, 0.9, 0.5], [0.2, 0.3, 0.4, 0.4]])
    out = retrieval_recall(sim, [0, 0, 1, 1], ks=(1, 2))
    # image 0: its best caption (0.9) ties with text 2 (0.9, wrong): rank 1 → not R@1, within R@2
    # image 1: its best captions tie with each other (texts 2, 3: 0.4, both its own) and beat the
    # wrong ones (0.2, 0.3): rank 0 — a tie among an image's own captions is no miss
    assert out["i2t_r1"] == 50.0 and out["i2t_r2"] == 100.0
    # text→image: t0 0.9 vs 0.2 → rank 0; t1 0.1 vs 0.3 → rank 1; t2 0.9 vs 0.4 → rank 1; t3 0.5 vs 0.4 → rank 1
    assert out["t2i_r1"] == 25.0 and out["t2i_r2"] == 100.0
    assert out["r_mean"] == pytest.approx((75.0 + 62.5) / 2)
    constant = retrieval_recall(np.zeros((3, 3)), [0, 1, 2], ks=(1,))
    assert constant["i2t_r1"] == constant["t2i_r1"] == 0.0  # ties with wrong ones give no credit


def test_retrieval_recall_refuses_nan_and_scores_infinities():
    sim = np.array([[1.0, 0.0], [np.nan, 0.0], [0.0, np.nan]])
    with pytest.raises(ValueError, match="2 of 3 image rows have NaN"):
        retrieval_recall(sim, [0, 1])
    inf = np.array([[np.inf, 0.0], [-np.inf, 1.0]])  # ±inf are scores (ITM re-ranking writes -inf)
    out = retrieval_recall(inf, [0, 1], ks=(1,))
    assert out["i2t_r1"] == out["t2i_r1"] == 100.0
    worst = retrieval_recall(np.array([[-np.inf, np.inf], [np.inf, -np.inf]]), [0, 1], ks=(1,))
    assert worst["i2t_r1"] == worst["t2i_r1"] == 0.0


def test_itm_rerank_reorders_only_the_top_k():
    sim = np.array([[0.5, 0.4, 0.1]])
    # the ITM head prefers text 1; text 2 is outside the top 2 and drops out
    reranked = itm_rerank(sim, lambda row, cols: np.where(cols == 1, 1.0, 0.0), k=2)
    assert np.isneginf(reranked[0, 2])
    assert reranked[0].argmax() == 1
    assert reranked[0, 0] == pytest.approx(0.5) and reranked[0, 1] == pytest.approx(1.4)


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need Java")
def test_caption_scores_equal_pycocoevalcap_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = {
        1: ["A red circle.", "a red circle on the left"],
        2: ["Two blue squares!", "two squares"],
        3: ["a yellow star", "one star"],
    }
    preds = {1: "a red circle", 2: "two squares", 3: "a green star"}
    ours = caption_scores(preds, refs, spice=False)
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": c}] for k, c in preds.items()})
    bleu, _ = Bleu(4).compute_score(gts, res)
    direct = {f"Bleu_{i + 1}": b for i, b in enumerate(bleu)}
    direct["METEOR"] = Meteor().compute_score(gts, res)[0]
    direct["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    direct["CIDEr"] = Cider().compute_score(gts, res)[0]
    assert set(ours) == set(direct)
    for key, value in direct.items():
        assert ours[key] == pytest.approx(100 * value), key
    assert ours["CIDEr"] > 10  # ×100 scale, not the raw fraction


def test_random_ranking_recall_is_the_expectation_over_all_rankings():
    """The closed form against every ranking of a small case (2 images; 3 + 1 captions)."""
    owner = [0, 0, 0, 1]
    expected = random_ranking_recall([3, 1], ks=(1, 2, 3))
    i2t = [
        retrieval_recall(np.array([p, p], dtype=float), owner, ks=(1, 2, 3))
        for p in permutations(range(4))
    ]
    t2i = [
        retrieval_recall(np.array(cols, dtype=float).T, owner, ks=(1, 2, 3))
        for cols in product(permutations(range(2)), repeat=4)
    ]
    for k in (1, 2, 3):
        assert np.isclose(np.mean([r[f"i2t_r{k}"] for r in i2t]), expected[f"i2t_r{k}"])
        assert np.isclose(np.mean([r[f"t2i_r{k}"] for r in t2i]), expected[f"t2i_r{k}"])
    assert np.isclose(expected["i2t_r1"], 100 * (3 / 4 + 1 / 4) / 2)  # by hand


def test_every_line_separator_is_a_space_for_the_caption_tokenizer():
    """Every character that ends a line (for Python's splitlines, and so for Java's readers) is
    among those the caption scorer turns into spaces."""
    from tasks.caption import LINE_BREAKS, one_line

    breaks = [chr(c) for c in range(0x3000) if len(f"a{chr(c)}b".splitlines()) == 2]
    assert breaks and all(LINE_BREAKS.fullmatch(c) for c in breaks)
    assert one_line("a\r\nb\u2028c\x85d\te") == "a  b c d\te"  # a tab is no line separator


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need Java")
def test_line_separators_in_captions_score_as_spaces():
    """One ``\\r`` or U+2028 in one caption used to shift every later caption onto the wrong image
    in the PTB tokenizer (one caption a line for Java): an oracle's CIDEr fell from ~400 to ~20.
    Captions with line separators score exactly as the same captions with spaces."""
    words = ["red", "blue", "green", "small", "large", "round", "square", "bright"]
    refs = {
        i: [f"a {words[i % 8]} shape next to a {words[(i + j) % 8]} one" for j in range(1, 4)]
        for i in range(12)
    }
    oracle = {i: refs[i][0] for i in refs}
    seps = ["\r", "\u2028", "\u2029", "\x85", "\r\n", "\v"]
    dirty_refs = {i: [c.replace(" ", seps[i % 6], 1) for c in r] for i, r in refs.items()}
    dirty_oracle = {i: c.replace(" ", seps[(i + 1) % 6], 2) for i, c in oracle.items()}
    clean = caption_scores(oracle, refs, spice=False)
    dirty = caption_scores(dirty_oracle, dirty_refs, spice=False)
    assert clean["CIDEr"] > 300  # an oracle: its captions are references
    assert dirty == pytest.approx(clean, rel=1e-12)  # the same tokens: the same float64 sums


def test_nlvr2_truth_values_given_as_strings_are_refused():
    """ "True"/"False" strings (the official files' spelling) never equal a bool: they scored 0
    (and Task.score's bool() made "False" True); each is an error naming the identifier."""
    labels = {"dev-1-0-0": True, "dev-1-0-1": False}
    with pytest.raises(TypeError, match=r"prediction of identifier 'dev-1-0-1' is 'False'.*bool"):
        nlvr2_scores({"dev-1-0-0": True, "dev-1-0-1": "False"}, labels)
    with pytest.raises(TypeError, match=r"label of identifier 'dev-1-0-0' is 'True'.*bool"):
        nlvr2_scores(dict(labels), {**labels, "dev-1-0-0": "True"})
    assert nlvr2_scores({k: np.bool_(v) for k, v in labels.items()}, labels)["accuracy"] == 100.0
    task = get_task("nlvr2")(TaskConfig(reader="nlvr2", root="."))
    records = [{"id": k, "label": int(v)} for k, v in labels.items()]
    with pytest.raises(TypeError, match="identifier 'dev-1-0-0' is 'True'"):
        task.score(records, ["True", "False"])


@pytest.mark.parametrize(
    ("owner", "error", "match"),
    [
        ([0, -1], ValueError, r"text 1 is mapped to image -1, expected an index in 0\.\.1"),
        ([0, 2], ValueError, r"text 1 is mapped to image 2, expected an index in 0\.\.1"),
        ([0.0, 1.0], TypeError, "must be integer image indices, got float64"),
    ],
)
def test_retrieval_refuses_texts_mapped_to_no_image(owner, error, match):
    """A text mapped to image -1 was scored as the last image's (numpy's negative index)."""
    with pytest.raises(error, match=match):
        retrieval_recall(np.eye(2), owner)


def test_identical_texts_of_different_images_count_as_one(caplog):
    """Two images share the caption "a dog": a perfect scorer scores it the same against both (the
    same input), so under the ground-truth-only rule it misses both ways; with the texts given,
    identical texts are one text and it reaches 100, with one warning naming the count."""
    texts, owner = ["a dog", "a cat", "a dog"], [0, 0, 1]
    perfect = np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])  # text j among image i's captions
    strict = retrieval_recall(perfect, owner, ks=(1,))
    assert strict["i2t_r1"] == 0.0 and strict["t2i_r1"] == pytest.approx(100 / 3)
    with caplog.at_level("WARNING"):
        shared = retrieval_recall(perfect, owner, ks=(1,), texts=texts)
    assert shared["r_mean"] == 100.0
    assert [r.getMessage() for r in caplog.records] == [
        "retrieval gallery: 2 of 3 texts are identical to a text of another image; each counts "
        "as a hit for every image that has it (tasks.retrieval.retrieval_recall)"
    ]
    # a wrong text still scoring above the shared one is a miss: the rule adds no other credit
    worse = perfect.copy()
    worse[1, 1] = 2.0  # image 1 prefers "a cat" (image 0's only)
    out = retrieval_recall(worse, owner, ks=(1,), texts=texts)
    assert out["i2t_r1"] == 50.0 and out["t2i_r1"] == pytest.approx(100 * 2 / 3)


def test_a_perfect_scorer_reaches_100_on_the_synthetic_test_gallery(tmp_path, caplog):
    """The synthetic test split has 27 of its 150 captions shared with another image: a perfect
    scorer was capped at r_mean 84; Retrieval.score counts identical texts as one (warning once)
    and the random-ranking baseline counts them the same way (its exact expectation)."""
    from tasks.router import TaskRouter
    from tasks.synthetic import generate

    generate(tmp_path, seed=0)
    task = TaskRouter.from_yaml(tmp_path / "tasks.yaml", only=["retrieval"])["retrieval"]
    records = task.read("test")
    texts, owner = task.gallery_texts(records)
    perfect = np.array([[float(t in r["captions"]) for t in texts] for r in records])
    assert len(texts) == 150
    with caplog.at_level("WARNING"):
        scores, headline = task.score(records, {"i2t": perfect, "t2i": perfect})
    assert headline == 100.0 and scores["i2t_r1"] == scores["t2i_r1"] == 100.0
    assert [r.getMessage()[:52] for r in caplog.records] == [
        "retrieval gallery: 27 of 150 texts are identical to "
    ]
    assert retrieval_recall(perfect, owner)["r_mean"] < 85  # the ground-truth-only rule
    _, baseline, _ = task.baseline("test")
    draws = np.random.RandomState(0).rand(400, *perfect.shape)  # random rankings: same mean
    mean = np.mean([task.score(records, {"i2t": d, "t2i": d})[0]["t2i_r5"] for d in draws])
    assert mean == pytest.approx(baseline["t2i_r5"], abs=1.5)  # 400 draws: ~0.3 standard error


def test_random_ranking_recall_with_shared_texts_is_the_expectation_over_all_rankings():
    """The closed form with several right images per text against every ranking of a small case
    (2 images; texts "a", "a", "b" of images 0, 1, 1: text "a" is right for both)."""
    texts, owner = ["a", "a", "b"], [0, 1, 1]
    expected = random_ranking_recall([2, 3], ks=(1, 2), text_positives=[2, 2, 1])
    i2t = [
        retrieval_recall(np.array([p, p], dtype=float), owner, ks=(1, 2), texts=texts)
        for p in permutations(range(3))
    ]
    t2i = [
        retrieval_recall(np.array(cols, dtype=float).T, owner, ks=(1, 2), texts=texts)
        for cols in product(permutations(range(2)), repeat=3)
    ]
    for k in (1, 2):
        assert np.isclose(np.mean([r[f"i2t_r{k}"] for r in i2t]), expected[f"i2t_r{k}"])
        assert np.isclose(np.mean([r[f"t2i_r{k}"] for r in t2i]), expected[f"t2i_r{k}"])
    assert np.isclose(expected["t2i_r1"], 100 * (1 + 1 + 1 / 2) / 3)  # by hand
