"""End to end, evaluation scores known predictions against numbers computed by hand: a prediction
paired with the wrong record, or one direction of retrieval computed from the other, would fail."""

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturb_adapters

import vlpeft
from evaluation import baselines as old_baselines
from evaluation.evaluate import evaluate_task
from tasks import baselines
from tasks.base import DataError, list_tasks
from tasks.retrieval import retrieval_recall
from tasks.router import TaskRouter
from tasks.synthetic import generate
from tasks.vqa import vqa_question_accuracy, vqa_question_accuracy_vladapter


class Settings:
    max_new_tokens, num_beams, itm_k, max_records = 4, 1, 0, None


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, images=40, seed=1, size=32)
    return TaskRouter.from_yaml(root / "tasks.yaml")


def test_vqa_scores_each_prediction_against_its_own_question(router, tmp_path):
    records = router["vqa"].read("test")
    # a known answer per question: right for every other question, a wrong one elsewhere
    known = {r["question_id"]: (r["target"] if i % 2 else "purple") for i, r in enumerate(records)}
    model = vlpeft.build_model("clip-bart", "tiny", image_size=32)
    model.generate = lambda batch, **kw: [known[q] for q in batch["ids"]]
    record = evaluate_task(model, router, "vqa", "test", tmp_path, Settings())
    expected = [vqa_question_accuracy(known[r["question_id"]], r["answers"]) for r in records]
    assert record["headline"] == pytest.approx(round(100 * sum(expected) / len(expected), 2))
    assert 0 < record["headline"] < 100
    submitted = json.loads((tmp_path / "vqa_test_predictions.json").read_text())
    assert {p["question_id"]: p["answer"] for p in submitted} == known
    # a cased generation ("Yes" from a cased tokenizer) is submitted lower-cased, as the server
    # compares it verbatim with ten identical lower-case answers
    model.generate = lambda batch, **kw: [known[q].upper() for q in batch["ids"]]
    again = evaluate_task(model, router, "vqa", "test", tmp_path, Settings())
    assert again["headline"] == record["headline"]


WORDS = {"0": "zero", "1": "one", "2": "two", "3": "three"}


def test_reference_scores_sit_beside_an_unchanged_official_headline(router, tmp_path):
    """``eval/<task>_<split>.json`` keeps the official headline and records VL-Adapter's score
    beside it (``reference.vladapter``, the headline's units) where its rule differs: VQA and GQA;
    NLVR² and captions are scored the same there, and record none."""
    records = router["vqa"].read("test")
    # number words for digits, "the" before the rest: the official rule and VL-Adapter's part
    known = {r["question_id"]: WORDS.get(r["target"], "the " + r["target"]) for r in records}
    model = vlpeft.build_model("clip-bart", "tiny", image_size=32)
    model.generate = lambda batch, **kw: [known[q] for q in batch["ids"]]
    record = evaluate_task(model, router, "vqa", "test", tmp_path, Settings())

    def mean(rule):
        values = [rule(known[r["question_id"]], r["answers"]) for r in records]
        return round(100 * sum(values) / len(values), 2)

    assert record["headline"] == mean(vqa_question_accuracy) == record["scores"]["overall"]
    assert record["reference"] == {"vladapter": mean(vqa_question_accuracy_vladapter)}
    assert record["reference"]["vladapter"] != record["headline"]
    assert json.loads((tmp_path / "vqa_test.json").read_text())["reference"] == record["reference"]
    gqa = router["gqa"].read("test")  # every other answer upper-cased: verbatim there
    answers = {r["id"]: (r["target"].upper() if i % 2 else r["target"]) for i, r in enumerate(gqa)}
    model.generate = lambda batch, **kw: [answers[i] for i in batch["ids"]]
    record = evaluate_task(model, router, "gqa", "test", tmp_path, Settings())
    assert record["headline"] == 100.0
    same = sum(answers[r["id"]] == r["target"] for r in gqa)
    assert 0 < same < len(gqa) and record["reference"] == {"vladapter": 100 * same / len(gqa)}
    for name in ("nlvr2", "caption", "retrieval"):
        assert router[name].reference_scores([], []) == {}


def test_the_leaderboard_carries_reference_scores_without_a_column(tmp_path):
    """run.json's ``vqa/test_vladapter`` and a score record's ``reference`` (an eval file of a
    split run.json lacks) reach the run's results as ``<task>/<split>_vladapter``; the table's
    columns are the official headlines only."""
    from evaluation import leaderboard

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    summary = {
        "run": "r",
        "method": "lora",
        "backbone": "clip-bart",
        "trainable": 1,
        "train_seconds": 1.0,
        "results": {"vqa/test": 60.0, "vqa/test_vladapter": 55.0},
    }
    (run / "run.json").write_text(json.dumps(summary))
    val = {
        "task": "vqa",
        "reader": "vqa",
        "split": "val",
        "metric": "accuracy",
        "headline": 61.0,
        "reference": {"vladapter": 57.5},
        "scores": {"overall": 61.0},
        "data": None,
    }
    (run / "eval" / "vqa_val.json").write_text(json.dumps(val))
    loaded = leaderboard.load_summary(run)
    assert loaded["results"] == {"vqa/test": 60.0, "vqa/test_vladapter": 55.0, "vqa/val": 61.0,
                                 "vqa/val_vladapter": 57.5}  # fmt: skip
    for split, value in (("test", 60.0), ("val", 61.0)):
        names, table = leaderboard.rows([loaded], split)
        assert names == ["vqa"] and table[0]["vqa"] == value and table[0]["average"] == value
        markdown = leaderboard.main([str(run), "--split", split, "--out", str(tmp_path / "b.md")])
        assert "vladapter" not in markdown and f"| {value:.2f} |" in markdown


def test_retrieval_scores_both_directions_with_itm_reranking(router, tmp_path):
    records = router["retrieval"].read("test")
    texts = [c for r in records for c in r["captions"]]
    owner = [i for i, r in enumerate(records) for _ in r["captions"]]
    g = torch.Generator().manual_seed(0)
    image_emb = torch.nn.functional.normalize(torch.randn(len(records), 8, generator=g), dim=-1)
    text_emb = torch.nn.functional.normalize(torch.randn(len(texts), 8, generator=g), dim=-1)
    itm = torch.randn(len(records), len(texts), generator=g)  # a fixed ITM logit per pair
    index = {"images": 0}  # encode_images is called batch by batch, in record order
    model = vlpeft.build_model("blip", "tiny", heads=["retrieval"])

    def encode_images(images):
        start = index["images"]
        index["images"] = start + len(images)
        rows = torch.arange(start, start + len(images))
        return image_emb[rows], rows[:, None, None].float().expand(-1, 1, 4)

    def encode_texts(batch):
        return text_emb[[texts.index(t) for t in batch]]

    def match(states, batch):
        rows = states[:, 0, 0].long()
        cols = torch.tensor([texts.index(t) for t in batch])
        return torch.stack([torch.zeros(len(rows)), itm[rows, cols]], dim=1)

    model.encode_images, model.encode_texts, model.match = encode_images, encode_texts, match
    settings = Settings()
    settings.itm_k = 3
    record = evaluate_task(model, router, "retrieval", "test", tmp_path, settings)
    sim = (image_emb @ text_emb.T).numpy().astype(np.float64)
    i2t = np.full_like(sim, -np.inf)
    t2i = np.full_like(sim, -np.inf)
    for i in range(sim.shape[0]):  # image→text: each image's top 3 captions re-ranked
        top = np.argsort(-sim[i], kind="stable")[:3]
        i2t[i, top] = itm.numpy()[i, top] + sim[i, top]
    for j in range(sim.shape[1]):  # text→image: each caption's top 3 images re-ranked
        top = np.argsort(-sim[:, j], kind="stable")[:3]
        t2i[top, j] = itm.numpy()[top, j] + sim[top, j]
    expected_i2t = retrieval_recall(i2t, owner)
    expected_t2i = retrieval_recall(t2i, owner)
    scores = record["scores"]
    for k in (1, 5, 10):
        assert scores[f"i2t_r{k}"] == pytest.approx(expected_i2t[f"i2t_r{k}"])
        assert scores[f"t2i_r{k}"] == pytest.approx(expected_t2i[f"t2i_r{k}"])
    # the test tells the directions apart: text→image read off the image→text matrix differs
    assert retrieval_recall(i2t, owner)["t2i_mean"] != pytest.approx(expected_t2i["t2i_mean"])


def test_a_test_dev_split_gives_a_submission_file_without_scores(router, tmp_path):
    """VQAv2 test-dev has questions only (images in test2015/): predictions become the server's
    submission file instead of failing on the missing answers."""
    import shutil

    vqa = router["vqa"]
    root, images = vqa.root, vqa.image_root
    val = json.loads((root / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    questions = val["questions"][:5]
    (root / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(
        json.dumps({"questions": questions})
    )
    (images / "test2015").mkdir(exist_ok=True)
    for q in questions:
        name = f"COCO_val2014_{q['image_id']:012d}.jpg"
        shutil.copy(
            images / "val2014" / name, images / "test2015" / name.replace("val2014", "test2015")
        )
    config = {**vqa.config.__dict__, "splits": {**vqa.config.splits, "test": "test-dev2015"}}
    testdev = TaskRouter.from_dict({"vqa": config}, "/")
    model = vlpeft.build_model("clip-bart", "tiny", image_size=32)
    model.generate = lambda batch, **kw: ["Two"] * len(batch["ids"])
    record = evaluate_task(model, testdev, "vqa", "test", tmp_path, Settings())
    assert record["headline"] is None and "evaluation server" in record["note"]
    server_file = tmp_path / "vqa_OpenEnded_mscoco_test-dev2015_vlpeft_results.json"
    assert record["predictions"] == str(server_file)  # named as the VQA server expects
    submitted = json.loads(server_file.read_text())
    assert submitted == [{"question_id": q["question_id"], "answer": "two"} for q in questions]
    assert testdev["vqa"].baseline("test")[2] is None  # nothing to score the baseline on either
    second = TaskRouter.from_dict({"vqa_blip": config}, "/")  # another VQA task of the run
    record = evaluate_task(model, second, "vqa_blip", "test", tmp_path, Settings())
    assert record["predictions"].endswith(
        "vqa_OpenEnded_mscoco_test-dev2015_vlpeft-vqa_blip_results.json"
    )


def test_hidden_gqa_and_nlvr2_test_splits_give_their_submission_files(router, tmp_path):
    """GQA's test questions and NLVR²'s hidden test2 come without answers/labels: the official
    submission files are written, nothing is scored; a split where only some records are
    annotated is an error naming one."""
    gqa, nlvr2 = router["gqa"], router["nlvr2"]
    questions = json.loads((gqa.root / "testdev_balanced_questions.json").read_text())
    hidden = {
        qid: {k: v for k, v in q.items() if k != "answer"} for qid, q in list(questions.items())[:4]
    }
    (gqa.root / "test_balanced_questions.json").write_text(json.dumps(hidden))
    rows = [json.loads(x) for x in (nlvr2.root / "test1.json").read_text().splitlines()[:4]]
    (nlvr2.root / "test2.json").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "label"}) + "\n" for r in rows)
    )
    shutil.copytree(nlvr2.image_root / "test1", nlvr2.image_root / "test2", dirs_exist_ok=True)
    configs = {
        "gqa": {**gqa.config.__dict__, "splits": {**gqa.config.splits, "test": "test"}},
        "nlvr2": {**nlvr2.config.__dict__, "splits": {**nlvr2.config.splits, "test": "test2"}},
    }
    hidden_router = TaskRouter.from_dict(configs, "/")
    model = vlpeft.build_model("clip-bart", "tiny", image_size=32)
    model.generate = lambda batch, **kw: ["red"] * len(batch["ids"])
    model.score_choices = lambda batch, choices: torch.tensor([[1.0, 0.0]] * len(batch["ids"]))
    record = evaluate_task(model, hidden_router, "gqa", "test", tmp_path, Settings())
    assert record["headline"] is None and "cannot be scored locally" in record["note"]
    assert json.loads(Path(record["predictions"]).read_text()) == [
        {"questionId": qid, "prediction": "red"} for qid in hidden
    ]
    record = evaluate_task(model, hidden_router, "nlvr2", "test", tmp_path, Settings())
    assert record["headline"] is None
    assert Path(record["predictions"]).read_text().splitlines() == [
        f"{r['identifier']},True" for r in rows
    ]
    hidden[next(iter(hidden))]["answer"] = "yes"  # one annotated, three not
    (gqa.root / "test_balanced_questions.json").write_text(json.dumps(hidden))
    with pytest.raises(
        DataError, match=r"test_balanced_questions.json: record '.*' has no annotation while 1 of"
    ):
        evaluate_task(model, hidden_router, "gqa", "test", tmp_path, Settings())


def test_baselines_command_scores_every_task_of_the_file(router, capsys):
    """``python -m tasks.baselines TASKS_YAML``: each task's no-image baseline, scored like a model;
    ``python -m evaluation.baselines`` (its old name) says where it went."""
    tasks_yaml = router["vqa"].root.parent / "tasks.yaml"
    summary = baselines.main([str(tasks_yaml), "--split", "test"])
    assert sorted(summary) == sorted(router.tasks)
    assert all(0 <= row["headline"] <= 100 for row in summary.values())
    assert summary["retrieval"]["baseline"] == "random ranking"
    assert "vqa/test: " in capsys.readouterr().out
    assert old_baselines.main([]) == 2 and "python -m tasks.baselines" in capsys.readouterr().err


# -- every task: an oracle model against the no-image baseline ---------------------------------------
def right_answers(model, records):
    answer = {r["id"]: r["target"] for r in records}
    model.generate = lambda batch, **kw: [answer[i] for i in batch["ids"]]


def right_labels(model, records):
    label = {r["id"]: r["label"] for r in records}
    model.score_choices = lambda batch, choices: torch.tensor(
        [[1.0, 0.0] if label[i] else [0.0, 1.0] for i in batch["ids"]]
    )


def reference_captions(model, records):
    caption = {r["image_id"]: r["captions"][0] for r in records}
    model.generate = lambda batch, **kw: [caption[i] for i in batch["ids"]]


def matching_gallery(model, records):
    """Image i is the i-th unit vector; a caption the normalised sum of its images' vectors."""
    owners = defaultdict(set)
    for i, r in enumerate(records):
        for caption in r["captions"]:
            owners[caption].add(i)
    seen = {"images": 0}  # encode_images is called batch by batch, in record order

    def encode_images(images):
        rows = torch.arange(seen["images"], seen["images"] + len(images))
        seen["images"] += len(images)
        return torch.eye(len(records))[rows], torch.zeros(len(images), 1, 4)

    def encode_texts(texts):
        hot = torch.zeros(len(texts), len(records))
        for row, text in enumerate(texts):
            hot[row, sorted(owners[text])] = 1.0
        return torch.nn.functional.normalize(hot, dim=-1)

    model.encode_images, model.encode_texts = encode_images, encode_texts


# task → (family, its settings, how an oracle predicts, the headline it must reach or None: above
# the baseline only). A registered task without a row fails, naming it.
ORACLES = {
    "vqa": ("clip-bart", {"image_size": 32}, right_answers, 100.0),
    "gqa": ("clip-bart", {"image_size": 32}, right_answers, 100.0),
    "nlvr2": ("clip-bart", {"image_size": 32}, right_labels, 100.0),
    "caption": ("clip-bart", {"image_size": 32}, reference_captions, None),  # CIDEr: no ceiling
    "retrieval": ("blip", {"heads": ["retrieval"]}, matching_gallery, 100.0),
}


@pytest.mark.parametrize("name", list_tasks())
def test_every_task_scores_an_oracle_above_its_no_image_baseline(name, router, tmp_path):
    """The task's predict → score path end to end: an oracle reaches the metric's top (where it
    has one) and beats the baseline, which is scored on the same records the same way."""
    if name not in ORACLES:
        pytest.fail(f"task {name!r} has no row in ORACLES (tests/test_evaluate.py)")
    if name == "caption" and shutil.which("java") is None:
        pytest.skip("METEOR and the PTB tokenizer need Java")
    family, settings, oracle, best = ORACLES[name]
    model = vlpeft.build_model(family, "tiny", **settings)
    oracle(model, router[name].read("test"))
    record = evaluate_task(model, router, name, "test", tmp_path, Settings())
    _, _, floor = router[name].baseline("test")
    assert record["headline"] > floor
    if best is not None:
        assert record["headline"] == pytest.approx(best)


# -- max_records, and a split without answers ------------------------------------------------------
def test_max_records_cuts_a_scored_split_but_never_a_submission_file(router, tmp_path, caplog):
    """A run's ``eval.max_records`` (and a task's own ``max_records``) cut an annotated split; a
    split without answers is predicted whole — a cut submission file would be scored by the server
    as if the missing questions were answered wrong — and one log line says so."""
    vqa = router["vqa"]
    val = json.loads((vqa.root / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    questions = val["questions"][:5]
    (vqa.root / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(
        json.dumps({"questions": questions})
    )
    (vqa.image_root / "test2015").mkdir(exist_ok=True)
    for q in questions:
        name = f"COCO_val2014_{q['image_id']:012d}.jpg"
        shutil.copy(
            vqa.image_root / "val2014" / name,
            vqa.image_root / "test2015" / name.replace("val2014", "test2015"),
        )
    splits = {**vqa.config.splits, "dev": "test-dev2015"}
    limited = TaskRouter.from_dict({"vqa": {**vqa.config.__dict__, "splits": splits}}, "/")
    model = vlpeft.build_model("clip-bart", "tiny", image_size=32)
    model.generate = lambda batch, **kw: ["two"] * len(batch["ids"])
    settings = Settings()
    settings.max_records = 2
    for task_limit in (None, 3):  # the run's eval.max_records, then the task's as well
        limited["vqa"].config.max_records = task_limit
        with caplog.at_level("INFO", logger="vlpeft.evaluate"):
            record = evaluate_task(model, limited, "vqa", "dev", tmp_path, settings)
        submitted = json.loads(Path(record["predictions"]).read_text())
        assert [p["question_id"] for p in submitted] == [q["question_id"] for q in questions]
        assert record["data"]["records"] == 5 and record["data"]["max_records"] is None
        assert "vqa/dev has no answers: all 5 records are predicted" in caplog.text
        caplog.clear()
        scored = evaluate_task(model, limited, "vqa", "test", tmp_path, settings)
        assert scored["data"]["records"] == 2 and scored["data"]["max_records"] == 2
        assert scored["headline"] is not None and "has no answers" not in caplog.text


# -- python -m launch.evaluate RUN --mixed / --max-records -------------------------------------------
@pytest.fixture(scope="module")
def three_task_run(tmp_path_factory):
    """A tiny run with one LoRA set per task (VQA routed, GQA, captions), trained for 2 steps."""
    from launch.config import load_config
    from launch.train import train

    root = tmp_path_factory.mktemp("mixed")
    generate(root / "data", images=24, seed=0, size=32)
    lora = {"method": "lora", "r": 4, "dropout": 0.0}
    spec = {
        "model": {"family": "clip-bart", "preset": "tiny", "overrides": {"image_size": 32}},
        "adapters": {"vqa": {**lora, "routing": "mul"}, "gqa": lora, "caption": lora},
        "data": {"file": str(root / "data" / "tasks.yaml"),
                 "tasks": {"vqa": {"batch_size": 4, "adapter": "vqa", "routing": "relu_add"},
                           "gqa": {"batch_size": 4, "adapter": "gqa", "eval_batch_size": 3},
                           "caption": {"batch_size": 4, "adapter": "caption"}}},
        "train": {"steps": 2, "lr": 5e-2, "checkpoint_every": 0, "log_every": 1, "tensorboard": False},
        "eval": {"splits": [], "max_records": 5, "max_new_tokens": 4},
    }  # fmt: skip
    train(load_config(None, data=spec), root / "run")
    return root / "run"


def test_mixed_evaluation_gives_the_per_task_scores(three_task_run, tmp_path):
    """``--mixed`` puts every task's records in batches that mix the tasks (each row through its
    task's adapter set and routing function) and writes what the per-task evaluation writes."""
    from evaluation.evaluate import evaluate_mixed
    from launch.evaluate import main
    from launch.run import load_run

    run = three_task_run
    written = {}
    for how in ([], ["--mixed"]):
        assert main([str(run), "--split", "test", *how]) == 0
        written[bool(how)] = {
            p.name: json.loads(p.read_text()) for p in sorted((run / "eval").glob("*.json"))
        }
        for record in written[bool(how)].values():
            if isinstance(record, dict):
                record.pop("predictions", None)
    assert written[True] == written[False]
    assert {f"{t}_test.json" for t in ("vqa", "gqa", "caption")} <= set(written[True])
    # in-process, with perturbed adapters so that the sets' predictions differ
    model, router, config = load_run(run)
    perturb_adapters(model, scale=0.5)
    with torch.no_grad():  # no early end-of-sequence: answers of several words
        model.bart.final_logits_bias[..., model.bart.config.eos_token_id] -= 100
    per_task = {
        name: json.loads(Path(evaluate_task(model, router, name, "test", tmp_path / name,
                                            config.eval)["predictions"]).read_text())
        for name in router.tasks
    }  # fmt: skip
    mixed = evaluate_mixed(model, router, "test", tmp_path / "mixed", config.eval)
    for name, predictions in per_task.items():
        assert json.loads(Path(mixed[f"{name}/test"]["predictions"]).read_text()) == predictions
    vqa = router["vqa"].config  # the VQA questions through GQA's set give other answers
    vqa.adapter, vqa.routing = "gqa", None
    other = evaluate_task(model, router, "vqa", "test", tmp_path / "other", config.eval)
    assert json.loads(Path(other["predictions"]).read_text()) != per_task["vqa"]
    assert (
        len({p["answer"] for p in per_task["vqa"]} | {p["prediction"] for p in per_task["gqa"]}) > 1
    )


def test_a_tasks_own_generation_settings_hold_alone_and_in_mixed_batches(three_task_run, tmp_path):
    """VL-Adapter decodes VQA/GQA greedily and captions with 5 beams: a task's ``num_beams`` /
    ``max_new_tokens`` override the eval section's, and ``--mixed`` keeps each task's."""
    from evaluation.evaluate import evaluate_mixed
    from launch.run import load_run

    model, router, config = load_run(three_task_run)
    perturb_adapters(model, scale=0.5)
    with torch.no_grad():  # no early end-of-sequence: every caption takes all its tokens
        model.bart.final_logits_bias[..., model.bart.config.eos_token_id] -= 100
    calls = []
    generate = model.generate

    def recording(batch, **kwargs):
        calls.append((batch.get("kind"), kwargs))
        return generate(batch, **kwargs)

    model.generate = recording

    def captions(out):
        record = evaluate_task(model, router, "caption", "test", tmp_path / out, config.eval)
        return json.loads(Path(record["predictions"]).read_text())

    before = captions("before")
    router["caption"].config.max_new_tokens, router["caption"].config.num_beams = 2, 3
    after = captions("after")
    assert calls[-1] == ("caption", {"max_new_tokens": 2, "num_beams": 3})
    lengths = [len(model.tokenizer(p["caption"])["input_ids"]) for p in after]
    assert max(lengths) < max(len(model.tokenizer(p["caption"])["input_ids"]) for p in before)
    per_task = {
        name: json.loads(Path(evaluate_task(model, router, name, "test", tmp_path / name,
                                            config.eval)["predictions"]).read_text())
        for name in router.tasks
    }  # fmt: skip
    calls.clear()
    mixed = evaluate_mixed(model, router, "test", tmp_path / "mixed", config.eval)
    for name, predictions in per_task.items():
        assert json.loads(Path(mixed[f"{name}/test"]["predictions"]).read_text()) == predictions
    assert {str(kw) for _, kw in calls} == {
        str({"max_new_tokens": 4, "num_beams": 1}),
        str({"max_new_tokens": 2, "num_beams": 3}),
    }


def test_max_records_option_overrides_the_runs_value(three_task_run):
    from launch.evaluate import main

    run = three_task_run
    for option, expected in ((["--max-records", "2"], 2), (["--max-records", "all"], None)):
        assert main([str(run), "--task", "gqa", "--split", "test", *option]) == 0
        data = json.loads((run / "eval" / "gqa_test.json").read_text())["data"]
        assert data["max_records"] == expected
        assert data["records"] == (2 if expected else len(TaskRouter.from_yaml(
            run.parent / "data" / "tasks.yaml")["gqa"].read("test")))  # fmt: skip
    with pytest.raises(SystemExit):
        main([str(run), "--max-records", "0"])
