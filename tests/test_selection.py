"""Checkpoint selection (``eval.select: best``) and splits made of several splits (``train+val``)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import launch.engine as engine_module
import launch.train as train_module
import vlpeft
from launch.config import ConfigError, RunError, load_config
from launch.run import build_router
from launch.selection import Selector, groups, voters
from tasks.records import Chain
from tasks.synthetic import generate


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, images=40, seed=0, size=32)
    return root


def spec(data, **eval_settings):
    return {
        "model": {"family": "clip-bart", "preset": "tiny", "overrides": {"image_size": 32}},
        "adapters": {"default": {"method": "lora", "r": 4, "routing": "mul"}},
        "data": {"file": str(data / "tasks.yaml"),
                 "tasks": {"vqa": {"batch_size": 4}, "gqa": {"batch_size": 4}}},
        "train": {"steps": 8, "lr": 3e-2, "checkpoint_every": 2, "keep_checkpoints": 10,
                  "log_every": 1, "loggers": []},
        "eval": {"splits": [], "max_records": 6, "max_new_tokens": 3, "select": "best",
                 "val_every": 2, **eval_settings},
    }  # fmt: skip


# scripted validation headlines: VQA alone would choose step 4, the mean of both chooses step 6
SCRIPTED = {"vqa": {2: 10.0, 4: 30.0, 6: 20.0, 8: 25.0}, "gqa": {2: 50.0, 4: 0.0, 6: 45.0, 8: 30.0}}


@pytest.fixture
def scripted(monkeypatch):
    """Validation records carry SCRIPTED's headlines (a tiny model's accuracies are all 0)."""
    real = train_module.run_evaluation

    def evaluation(model, router, config, run_dir, splits, logger, step):
        records = real(model, router, config, run_dir, splits, logger, step)
        for key, record in records.items():
            task, split = key.split("/")
            if split == "val":
                record["headline"] = SCRIPTED[task][step]
        return records

    monkeypatch.setattr(train_module, "run_evaluation", evaluation)


def as_parameter_names(adapter_file) -> dict:
    """adapters/'s tensors under their parameter names (``<layer>.adapters.default.<key>``)."""
    out = {}
    for key, value in load_file(adapter_file).items():
        layer, _, leaf = key.rpartition(".")
        out[f"{layer}.adapters.default.{leaf}" if "lora_" in leaf else key] = value
    return out


def test_best_keeps_the_best_validation_step_and_evaluates_it(data, tmp_path, scripted):
    config = load_config(None, data=spec(data))
    summary = train_module.train(config, tmp_path / "run")
    assert summary["select"] == "best"
    assert summary["selected"] == {
        "default": {
            "step": 6,
            "score": 32.5,
            "voters": ["gqa", "vqa"],
            "scores": {"gqa": 45.0, "vqa": 20.0},
        }
    }
    # adapters/ holds the tensors of step 6 (validation runs before that step's checkpoint)
    saved = as_parameter_names(tmp_path / "run" / "adapters" / "adapter_model.safetensors")
    checkpoints = tmp_path / "run" / "checkpoints"
    at_6 = load_file(checkpoints / "step_0000006" / "trainable.safetensors")
    at_8 = load_file(checkpoints / "step_0000008" / "trainable.safetensors")
    assert saved.keys() == at_6.keys()
    assert all(torch.equal(saved[k], at_6[k]) for k in saved)
    assert not all(torch.equal(saved[k], at_8[k]) for k in saved)  # not the last step's
    # the selected file is kept whatever the rotation; the files no checkpoint refers to go
    kept = sorted(p.name for p in (tmp_path / "run" / "selected" / "default").iterdir())
    assert kept == ["step_0000002.safetensors", "step_0000006.safetensors"]
    last = train_module.train(load_config(None, ["eval.select=last"], data=spec(data)),
                              tmp_path / "last")  # fmt: skip
    assert last["selected"] == {}
    final = as_parameter_names(tmp_path / "last" / "adapters" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], at_8[k]) for k in final)


def test_rotation_never_removes_the_selected_weights(data, tmp_path, scripted):
    config = load_config(None, ["train.keep_checkpoints=1"], data=spec(data))
    summary = train_module.train(config, tmp_path / "run")
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_0000008"]
    assert summary["selected"]["default"]["step"] == 6
    kept = sorted(p.name for p in (tmp_path / "run" / "selected" / "default").iterdir())
    assert kept == ["step_0000006.safetensors"]


def assert_resumes_as(whole: dict, data, tmp_path) -> None:
    """Resuming tmp_path/resumed selects what the uninterrupted run did and ends with its
    adapters, bit for bit."""
    resumed = train_module.train(
        load_config(None, data=spec(data)), tmp_path / "resumed", resume=True
    )
    assert resumed["selected"] == whole["selected"]
    a = load_file(tmp_path / "whole" / "adapters" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapters" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_best_after_a_kill_selects_as_the_uninterrupted_run(data, tmp_path, monkeypatch, scripted):
    whole = train_module.train(load_config(None, data=spec(data)), tmp_path / "whole")
    calls = {"n": 0}
    real_step = engine_module.train_step

    def dying_step(run, micro_batches):
        calls["n"] += 1
        if calls["n"] == 6:  # during step 6: validation 2 and 4 are in the step-4 checkpoint
            raise KeyboardInterrupt("killed")
        return real_step(run, micro_batches)

    monkeypatch.setattr(engine_module, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(load_config(None, data=spec(data)), tmp_path / "resumed")
    monkeypatch.setattr(engine_module, "train_step", real_step)
    state = json.loads((tmp_path / "resumed/checkpoints/step_0000004/state.json").read_text())
    assert state["selected"]["default"]["step"] == 2
    assert_resumes_as(whole, data, tmp_path)


def test_select_is_fixed_for_the_run(data, tmp_path):
    config = load_config(None, ["train.steps=2"], data=spec(data))
    train_module.train(config, tmp_path / "run")
    for change in (
        ["eval.select=last"],
        ["eval.val_every=1"],
        ["eval.num_beams=2"],
        ["data.tasks.gqa.max_new_tokens=2"],
        ["data.tasks.vqa.prompt=question"],
    ):
        again = load_config(None, ["train.steps=4", *change], data=spec(data))
        with pytest.raises(RunError, match=change[0].split("=")[0]):
            train_module.train(again, tmp_path / "run", resume=True, allow_change=["train", "eval"])


def test_best_needs_validation_and_voters(data):
    with pytest.raises(ConfigError, match=r"eval.val_every must be > 0 with eval.select: best"):
        load_config(None, ["eval.val_every=0"], data=spec(data))
    with pytest.raises(ConfigError, match=r"eval.select must be .last. or .best., got .first."):
        load_config(None, ["eval.select=first"], data=spec(data))
    # a task whose validation split is part of its training data does not vote
    config = load_config(None, ["data.tasks={gqa: {splits: {train: train+val}}}"], data=spec(data))
    router = build_router(config)
    assert router["gqa"].config.splits == {"train": "train+val", "val": "val", "test": "testdev"}
    assert voters(router) == {"default": []}
    model = train_module.launch_run.build_model(config, router)
    with pytest.raises(ConfigError, match=r"'default' have no task to choose their step"):
        Selector("unused", "best", voters(router)).check(model, router)


def two_sets(data, family="clip-bart"):
    two = spec(data)
    size = {"image_size": 32} if family == "clip-bart" else {"vision": {"image_size": 32}}
    two["model"] = {"family": family, "preset": "tiny", "overrides": size}
    two["adapters"] = {"vqa": {"method": "lora", "r": 2}, "gqa": {"method": "lora", "r": 2}}
    two["data"]["tasks"] = {"vqa": {"adapter": "vqa"}, "gqa": {"adapter": "gqa"}}
    return two


def test_sets_that_train_a_tensor_in_common_are_chosen_together(data, tmp_path, scripted):
    """CLIP-BART trains its visual projection under every set: the sets' tensors were trained
    together, so they are one unit, chosen at one step by all their voters (never mixed)."""
    config = load_config(None, data=two_sets(data))
    model = train_module.launch_run.build_model(config, build_router(config))
    found = groups(model)
    assert set(found) == {"gqa+vqa"}
    assert any(".adapters.vqa." in n for n in found["gqa+vqa"])
    assert any(".adapters.gqa." in n for n in found["gqa+vqa"])
    assert any(".adapters." not in n for n in found["gqa+vqa"])  # the visual projection
    summary = train_module.train(config, tmp_path / "run")
    assert {u: i["step"] for u, i in summary["selected"].items()} == {"gqa+vqa": 6}
    assert summary["selected"]["gqa+vqa"]["scores"] == {"gqa": 45.0, "vqa": 20.0}


def test_sets_that_share_nothing_take_their_own_best_step(data, tmp_path, scripted, monkeypatch):
    """GPT-2+ViT trains nothing but the adapters: each set is chosen by its own task (two
    caption tasks here, named as SCRIPTED's; their CIDEr is SCRIPTED's, so the Java scorers are
    not run)."""
    from tasks.caption import Caption

    monkeypatch.setattr(Caption, "score", lambda self, records, predictions: ({}, 0.0))
    captions = {
        "reader": "caption",
        "root": str(data / "coco"),
        "images": str(data / "coco/images"),
    }
    (tmp_path / "tasks.yaml").write_text(json.dumps({"vqa": captions, "gqa": captions}))
    spec = two_sets(data, "gpt2-vit")
    spec["data"]["file"] = str(tmp_path / "tasks.yaml")
    config = load_config(None, data=spec)
    summary = train_module.train(config, tmp_path / "run")
    steps = {unit: info["step"] for unit, info in summary["selected"].items()}
    assert steps == {"vqa": 4, "gqa": 2}  # SCRIPTED's best of each task
    final = load_file(tmp_path / "run" / "checkpoints" / "step_0000008" / "trainable.safetensors")
    model = train_module.launch_run.build_model(config, build_router(config))
    vlpeft.load_adapter(model, tmp_path / "run" / "adapters")  # what evaluate and export load
    params = dict(model.named_parameters())
    for unit, names in groups(model).items():
        at = load_file(tmp_path / "run" / "checkpoints" / f"step_{steps[unit]:07d}" /
                       "trainable.safetensors")  # fmt: skip
        assert all(torch.equal(params[n].detach(), at[n]) for n in names), unit
        assert not all(torch.equal(params[n].detach(), final[n]) for n in names), unit


def test_a_resume_validates_a_step_its_checkpoint_was_due(data, tmp_path, monkeypatch, scripted):
    """Killed after the step-4 checkpoint but before its validation: the resumed run validates
    step 4 first, and selects and ends as the uninterrupted one."""
    whole = train_module.train(load_config(None, data=spec(data)), tmp_path / "whole")
    real = train_module.run_evaluation

    def dying(model, router, config, run_dir, splits, logger, step):
        if step == 4:
            raise KeyboardInterrupt("killed during the validation of step 4")
        return real(model, router, config, run_dir, splits, logger, step)

    monkeypatch.setattr(train_module, "run_evaluation", dying)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(load_config(None, data=spec(data)), tmp_path / "resumed")
    state = json.loads((tmp_path / "resumed/checkpoints/step_0000004/state.json").read_text())
    assert state["validated"] == 2 and state["selected"]["default"]["step"] == 2
    monkeypatch.setattr(train_module, "run_evaluation", real)
    assert_resumes_as(whole, data, tmp_path)


def test_validation_leaves_the_training_random_state_alone(data, tmp_path):
    """A run that validates trains exactly as one that does not (eval.select: last)."""
    quiet = ["eval.select=last", "eval.val_every=0"]
    plain = train_module.train(load_config(None, quiet, data=spec(data)), tmp_path / "plain")
    validating = ["eval.select=last", "eval.val_every=2"]
    train_module.train(load_config(None, validating, data=spec(data)), tmp_path / "validating")
    a = load_file(tmp_path / "plain" / "adapters" / "adapter_model.safetensors")
    b = load_file(tmp_path / "validating" / "adapters" / "adapter_model.safetensors")
    assert plain["steps"] == 8 and all(torch.equal(a[k], b[k]) for k in a)


def test_an_unscorable_voter_is_refused_before_the_first_step(data, tmp_path):
    """A voter validating on questions without answers (a test-dev file) is refused before the
    first step, not at its first validation."""
    val = json.loads((data / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    questions = val["questions"][:5]
    (data / "vqa" / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(
        json.dumps({"questions": questions})
    )
    (data / "coco" / "images" / "test2015").mkdir(exist_ok=True)
    for q in questions:
        name = f"COCO_val2014_{q['image_id']:012d}.jpg"
        shutil.copy(data / "coco" / "images" / "val2014" / name,
                    data / "coco" / "images" / "test2015" / name.replace("val2014", "test2015"))  # fmt: skip
    config = load_config(None, ["data.tasks.vqa.splits={val: test-dev2015}"], data=spec(data))
    with pytest.raises(ConfigError, match=r"task vqa's val split \(test-dev2015\) has no answers"):
        train_module.train(config, tmp_path / "run")


def test_train_plus_val_reads_both_splits_in_order(data):
    config = load_config(None, ["data.tasks={gqa: {splits: {train: train+val}}}"], data=spec(data))
    task = build_router(config)["gqa"]
    train, val = task.read_cached("train"), task.read_cached("val")
    both = task.read("train")
    assert isinstance(both, Chain) and len(both) == len(train) + len(val)
    assert [r["id"] for r in both] == [r["id"] for r in train] + [r["id"] for r in val]
    assert both[len(train)]["id"] == val[0]["id"] and both[-1]["id"] == val[-1]["id"]
    assert both.present(task.annotation_key).all() and task.scorable(both)
    assert set(both.distinct("images", text=True)) == {
        str(p) for r in [*train, *val] for p in r["images"]
    }
    with pytest.raises(Exception, match=r"expected distinct names joined by \+"):
        task.read_named("train+train")
    from evaluation.evaluate import record_limit
    from tasks.check import check_task

    assert check_task("gqa", task, ["train"]) == []  # python -m tasks.check reads both parts
    assert record_limit(task, "train", 5) == (5, 5)  # a joined split is scorable as a whole


def test_reproduce_reuses_a_best_selected_run_only_with_its_validation(data, tmp_path):
    """A finished run is reused by launch.reproduce when only how it executed differs; with
    eval.select: best its validation interval chose the weights, so it must match too."""
    from launch.reproduce import REUSE_HINT, reuse_free
    from launch.resume import config_changes

    for select, refused in (("best", True), ("last", False)):
        run = tmp_path / select
        base = ["train.steps=2", f"eval.select={select}"]
        train_module.train(load_config(None, base, data=spec(data)), run)
        other = load_config(None, [*base, "eval.val_every=1"], data=spec(data))
        how = {"doing": "reusing a finished run", "hint": REUSE_HINT, "free": reuse_free(other)}
        if refused:
            with pytest.raises(RunError, match=r"eval.val_every: 2 → 1"):
                config_changes(run, other, **how)
        else:
            assert config_changes(run, other, **how) == {"eval.val_every": [2, 1]}
