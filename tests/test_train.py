"""The launcher end to end on the synthetic set: config errors, exact resume, evaluate, leaderboard."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import launch.checkpoints as checkpoints_module
import launch.engine as engine_module
import launch.run as run_module
import launch.train as train_module
from evaluation import leaderboard
from launch import evaluate
from launch.config import ConfigError, load_config
from tasks.base import DataError
from tasks.router import take
from tasks.synthetic import generate

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, images=40, seed=0, size=32)
    return root


def clip_bart_config(data, **train):
    return {
        "model": {"family": "clip-bart", "preset": "tiny", "overrides": {"image_size": 32}},
        "adapters": {"default": {"method": "lora", "r": 4, "routing": "mul", "dropout": 0.1}},
        "data": {"file": str(data / "tasks.yaml"),
                 "tasks": {"vqa": {"batch_size": 4}, "gqa": {"batch_size": 4}, "nlvr2": {"batch_size": 2}}},
        "train": {"steps": 6, "lr": 1e-2, "checkpoint_every": 3, "log_every": 1, "tensorboard": False, **train},
        "eval": {"splits": [], "max_records": 6, "max_new_tokens": 3},
    }  # fmt: skip


def test_config_errors_name_the_key(data):
    good = clip_bart_config(data)
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_config(None, ["train.stpes=3"], data=good)
    with pytest.raises(ConfigError, match="did you mean 'alpha'"):
        load_config(None, ["adapters.default.alpah=3"], data=good)
    with pytest.raises(ConfigError, match="model.family is required"):
        load_config(None, ["model.family="], data=good)
    with pytest.raises(ConfigError, match="mode"):
        load_config(None, ["sampler.mode=roundrobin"], data=good)
    with pytest.raises(ConfigError, match="train.steps: expected int, got 'many'"):
        load_config(None, ["train.steps=many"], data=good)
    blip = {**good, "model": {"family": "blip", "preset": "tiny"}}
    with pytest.raises(
        ConfigError, match=r"adapters.default: blip: routed adapters cannot go into"
    ):
        load_config(None, data=blip)  # placement is checked on load too, before any model exists
    blip["adapters"] = {"default": {"method": "lora", "r": 4}}
    with pytest.raises(ConfigError, match=r"adapters.default: blip: unknown module kind 'qq'"):
        load_config(None, ["adapters.default.kinds=[qq]"], data=blip)
    with pytest.raises(ConfigError, match=r"task 'nlvr2' \(reader nlvr2\).*'choices'.*'blip'"):
        load_config(None, data=blip)  # refused when the config loads, not at its first nlvr2 step
    retrieval_only = {**blip, "model": {**blip["model"], "overrides": {"heads": ["retrieval"]}}}
    with pytest.raises(ConfigError, match=r"task 'vqa' \(reader vqa\).*'answer'"):
        load_config(None, ["data.tasks={vqa: {}}"], data=retrieval_only)
    config = load_config(None, ["train.steps=9", "eval.splits=[val]", "train.lr=3e-3"], data=good)
    assert config.train.steps == 9 and config.eval.splits == ["val"]
    assert config.train.lr == 0.003  # YAML 1.1 reads 3e-3 as a string


def run(data, out, resume=False, **train):
    config = load_config(None, data=clip_bart_config(data, **train))
    return train_module.train(config, out, resume=resume)


def test_killed_run_resumes_to_identical_weights(data, tmp_path, monkeypatch):
    run(data, tmp_path / "whole")
    calls = {"n": 0}
    real_step = engine_module.train_step

    def dying_step(run, micro_batches):
        calls["n"] += 1
        if calls["n"] == 5:  # dies during step 5, after the step-3 checkpoint
            raise KeyboardInterrupt("killed")
        return real_step(run, micro_batches)

    monkeypatch.setattr(engine_module, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run(data, tmp_path / "resumed")
    monkeypatch.setattr(engine_module, "train_step", real_step)
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step_*")] == [
        "step_0000003"
    ]
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # killed mid-write: the partial line is dropped
    run(data, tmp_path / "resumed", resume=True)
    whole = load_file(tmp_path / "whole" / "adapters" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapters" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    kept = sorted(p.name for p in (tmp_path / "whole" / "checkpoints").glob("*"))
    assert kept == ["step_0000003", "step_0000006"]  # nothing half-written left behind


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(data, tmp_path, caplog):
    """A truncated file of the newest checkpoint is named and the newest intact one is used: the
    resumed run still ends where an uninterrupted one does."""
    run(data, tmp_path / "whole")
    run(data, tmp_path / "cut")
    newest = tmp_path / "cut" / "checkpoints" / "step_0000006" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    caplog.set_level("WARNING")
    run(data, tmp_path / "cut", resume=True)
    assert "step_0000006" in caplog.text and "trainable.safetensors has 100 bytes" in caplog.text
    whole = load_file(tmp_path / "whole" / "adapters" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "cut" / "adapters" / "adapter_model.safetensors")
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    for step in ("step_0000003", "step_0000006"):
        target = tmp_path / "cut" / "checkpoints" / step / "state.json"
        target.write_text(target.read_text()[:-5])
    from launch.run import RunError

    with pytest.raises(RunError, match="no intact checkpoint.*state.json"):
        run(data, tmp_path / "cut", resume=True)


def test_evaluate_and_leaderboard(data, tmp_path):
    summary = run(data, tmp_path / "a", steps=2)
    assert summary["trainable"] > 0 and summary["results"] == {}
    evaluate.main([str(tmp_path / "a"), "--split", "test"])
    vqa = json.loads((tmp_path / "a" / "eval" / "vqa_test.json").read_text())
    assert vqa["metric"] == "accuracy" and 0 <= vqa["headline"] <= 100
    assert set(vqa["scores"]["perAnswerType"]) <= {"yes/no", "number", "other"}
    predictions = json.loads((tmp_path / "a" / "eval" / "vqa_test_predictions.json").read_text())
    assert len(predictions) == 6 and set(predictions[0]) == {"question_id", "answer"}
    gqa = json.loads((tmp_path / "a" / "eval" / "gqa_test_predictions.json").read_text())
    assert set(gqa[0]) == {"questionId", "prediction"}
    nlvr = (tmp_path / "a" / "eval" / "nlvr2_test_predictions.csv").read_text().splitlines()
    assert all(line.split(",")[1] in ("True", "False") for line in nlvr)
    # two runs in one table (the second: the same run under another name, other numbers)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name, value in (("a", 10.0), ("b", 30.0)):
        info = json.loads((tmp_path / name / "run.json").read_text())
        info.update(run=name, results={"vqa/test": value, "nlvr2/test": value + 40})
        (tmp_path / name / "run.json").write_text(json.dumps(info))
    out = tmp_path / "board.md"
    markdown = leaderboard.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    assert "| a | lora r=4 mul |" in markdown and "| 50.00 | 10.00 | 30.00 |" in markdown
    assert (tmp_path / "board.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((tmp_path / "board.json").read_text())
    assert [r["average"] for r in table["rows"]] == [30.0, 50.0]
    assert (tmp_path / "board.csv").read_text().startswith("run,method,backbone")
    # a row without nlvr2: the average is over vqa alone, for both rows
    info = json.loads((tmp_path / "b" / "run.json").read_text())
    info["results"] = {"vqa/test": 30.0}
    (tmp_path / "b" / "run.json").write_text(json.dumps(info))
    leaderboard.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    table = json.loads((tmp_path / "board.json").read_text())
    assert [r["average"] for r in table["rows"]] == [10.0, 30.0]


def test_blip_retrieval_run_with_null_lora_and_resora(data, tmp_path):
    config = load_config(None, data={
        "model": {"family": "blip", "preset": "tiny", "overrides": {"heads": ["retrieval"]}},
        "adapters": {"default": {"method": "null_lora", "min_rank": 2, "max_rank": 4,
                                 "components": ["vision", "text_encoder"], "kinds": ["q", "v", "qkv"]}},
        "data": {"file": str(data / "tasks.yaml"), "tasks": {"retrieval": {"batch_size": 8}}},
        "resora": {"kind": "linear", "weight": 0.1},
        "train": {"steps": 3, "checkpoint_every": 0, "tensorboard": False},
        "eval": {"splits": ["test"], "max_records": 4, "itm_k": 2},
    })  # fmt: skip
    summary = train_module.train(config, tmp_path / "blip")
    scores = json.loads((tmp_path / "blip" / "eval" / "retrieval_test.json").read_text())["scores"]
    assert {"i2t_r1", "t2i_r1", "r_mean"} <= set(scores)
    assert summary["results"]["retrieval/test"] == scores["r_mean"]
    lines = [json.loads(x) for x in (tmp_path / "blip" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/resora" in line for line in lines)


def test_export_then_reload_predicts_like_the_run(data, tmp_path):
    """Two adapter sets, per-task routing: each exported task, loaded into a freshly built base
    model, gives the run's predictions and loss (vlpeft format and, for plain LoRA, peft's)."""
    from launch.export import export_task, load_exported, main
    from launch.run import load_run

    spec = clip_bart_config(data, steps=4, checkpoint_every=0)
    spec["adapters"] = {
        "routed": {"method": "lora", "r": 4, "routing": "mul", "dropout": 0.0},
        "plain": {"method": "lora", "r": 4, "dropout": 0.0, "trainable": ["layer_norm"]},
    }
    spec["data"]["tasks"] = {
        "vqa": {"batch_size": 4, "adapter": "routed", "routing": "add"},
        "gqa": {"batch_size": 4, "adapter": "routed"},
        "nlvr2": {"batch_size": 2, "adapter": "plain"},
    }
    run_dir = tmp_path / "run"
    train_module.train(load_config(None, data=spec), run_dir)
    model, router, _ = load_run(run_dir)
    for task, fmt in [("vqa", "vlpeft"), ("gqa", "vlpeft"), ("nlvr2", "peft-lora")]:
        out = tmp_path / f"{task}-{fmt}"
        if task == "gqa":
            main([str(run_dir), "--task", task, "--out", str(out)])  # the CLI
        else:
            export_task(run_dir, task, out, fmt)
        fresh, info = load_exported(out)
        assert info["task"] == task and info["format"] == fmt
        batch = take(router.dataset(task, "test", model, limit=4), range(4))
        router.activate(model, task)
        with torch.no_grad():
            assert torch.allclose(fresh.loss(batch), model.loss(batch), atol=1e-6), task
            assert fresh.generate(batch, max_new_tokens=4) == model.generate(
                batch, max_new_tokens=4
            )
    saved = json.loads((tmp_path / "vqa-vlpeft" / "adapter_config.json").read_text())
    assert saved["config"]["routing"] == "add"  # the task's routing, not the set's default
    with pytest.raises(TypeError, match="cannot be written as a plain peft LoRA"):
        export_task(run_dir, "vqa", tmp_path / "bad", "peft-lora")
    spec["adapters"]["plain"]["trainable"] = ["shared"]  # tied to the embeddings and lm_head
    train_module.train(load_config(None, data=spec), tmp_path / "tied")
    with pytest.raises(ValueError, match="tied to .*vlpeft format"):
        export_task(tmp_path / "tied", "nlvr2", tmp_path / "bad", "peft-lora")
    with pytest.raises(KeyError, match="no task 'caption'"):
        export_task(run_dir, "caption", tmp_path / "bad", "vlpeft")


def test_text_infilling_masks_runs_as_one_token():
    import random

    from launch.pretrain_text import corrupt, infill

    ids = list(range(10, 30))
    assert infill(ids, 0, 0.0, random.Random(0)) == ids
    assert infill(ids, 0, 0.999999, random.Random(0)) == [0]
    noisy = infill(ids, 0, 0.5, random.Random(1))
    assert all(not (a == b == 0) for a, b in zip(noisy, noisy[1:]))  # no two masks in a row
    kept = [t for t in noisy if t]
    assert kept == sorted(kept) and set(kept) < set(ids)  # the rest in order, some masked
    # the special tokens around a sentence ([CLS] … [SEP]) are never masked
    assert corrupt([2, *ids, 3], {2, 3}, 0, 0.999999, random.Random(0)) == [2, 0, 3]


def test_denoising_warm_start_learns_and_loads_as_pretrained(data, tmp_path):
    from launch.pretrain_text import pretrain
    from launch.run import build_model, build_router

    config = load_config(None, data=clip_bart_config(data))
    report = pretrain(config, tmp_path / "bart", steps=40, batch_size=16, lr=3e-3)
    assert report["loss_last"] < 0.7 * report["loss_first"]
    config.model.overrides.update(pretrained=True, weights={"text": str(tmp_path / "bart")})
    model = build_model(config, build_router(config))
    from transformers import BartForConditionalGeneration

    saved = BartForConditionalGeneration.from_pretrained(tmp_path / "bart").state_dict()
    ours = {k.replace(".base_layer", ""): v for k, v in model.bart.state_dict().items()}
    for name, tensor in saved.items():
        assert torch.equal(tensor, ours[name]), name
    with pytest.raises(ConfigError, match="written for clip-bart"):
        other = clip_bart_config(data)
        other["model"] = {"family": "blip", "preset": "tiny"}
        other["adapters"] = {"default": {"method": "lora", "r": 4}}
        other["data"]["tasks"] = {"vqa": {}, "gqa": {}}
        pretrain(load_config(None, data=other), tmp_path / "x", steps=1)


def test_init_from_starts_exactly_from_a_finished_run(data, tmp_path):
    """train.init_from: a later stage (ReSoRA's stage 2) starts from a finished run's adapters and
    trained tensors with a fresh optimizer and schedule; another adapter layout is refused."""
    from vlpeft.checkpoint import adapter_state_dict

    run(data, tmp_path / "stage1", steps=3)
    stage2 = clip_bart_config(data, steps=2, init_from=str(tmp_path / "stage1"))
    stage2["resora"] = {"kind": "linear", "weight": 0.1}
    config = load_config(None, data=stage2)
    started = train_module.setup(config, tmp_path / "stage2", 0, 1)
    saved = load_file(tmp_path / "stage1" / "adapters" / "adapter_model.safetensors")
    state = adapter_state_dict(started.model, "default")
    assert saved.keys() == state.keys()
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
    assert (
        started.scheduler.get_last_lr()[0] == config.train.lr
    )  # a fresh schedule (no warm-up here)
    summary = train_module.train(load_config(None, data=stage2), tmp_path / "stage2")
    assert summary["steps"] == 2 and summary["init_from"] == str(tmp_path / "stage1")
    started = json.loads((tmp_path / "stage2" / "weights.json").read_text())
    assert started == {"init_from": str(tmp_path / "stage1"), "weights": {}}  # random weights
    # --resume of the later stage continues it from its own checkpoint, not from stage 1 again
    longer = {**stage2, "train": {**stage2["train"], "steps": 4}}
    run_dir = tmp_path / "stage2b"
    train_module.train(load_config(None, data=longer), run_dir)
    shutil.rmtree(tmp_path / "stage1" / "adapters")  # resuming must not need it any more
    finished = load_file(run_dir / "adapters" / "adapter_model.safetensors")
    resumed = train_module.train(load_config(None, data=longer), run_dir, resume=True)
    assert resumed["steps"] == 4
    again = load_file(run_dir / "adapters" / "adapter_model.safetensors")
    for key, tensor in finished.items():
        assert torch.equal(again[key], tensor), key  # step 3's checkpoint → step 4, the same


def test_a_diverging_run_stops_with_a_clear_error_and_keeps_its_checkpoint(data, tmp_path):
    """lr 1e6: the loss becomes non-finite. Default: stop naming step, task and the last finite
    loss, the last good checkpoint intact, metrics.jsonl strict JSON. on_nonfinite: skip counts."""
    with pytest.raises(
        engine_module.NonFiniteError,
        match=r"step \d+ \(task \w+\): the (loss|gradient norm) is .*last finite loss",
    ):
        run(data, tmp_path / "stop", steps=6, lr=1e6, checkpoint_every=1)
    checkpoints = sorted((tmp_path / "stop" / "checkpoints").glob("step_*"))
    assert checkpoints
    for tensor in load_file(checkpoints[-1] / "trainable.safetensors").values():
        assert torch.isfinite(tensor).all()
    for line in (tmp_path / "stop" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    summary = run(
        data, tmp_path / "skip", steps=6, lr=1e6, on_nonfinite="skip", max_skipped_share=1.0
    )  # it diverges: most of its steps are skipped
    logged = [
        json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()
    ]
    skipped = [r["train/skipped"] for r in logged if "train/skipped" in r]
    assert summary["steps"] == 6 and skipped[-1] > 0
    assert summary["steps_skipped"] == skipped[-1]


def test_numeric_config_values_are_checked_by_meaning(data):
    good = clip_bart_config(data)
    for override, message in [
        ("train.grad_clip=-1", r"train.grad_clip must be > 0 \(or null"),
        ("train.lr=0", "train.lr must be finite and > 0"),
        ("train.steps=0", "train.steps must be >= 1"),
        ("train.steps=true", "train.steps: expected int, got True"),
        ("train.log_every=0", "train.log_every must be >= 1"),
        ("train.warmup=-1", "train.warmup must be finite and >= 0"),
        ("train.warmup=.inf", "train.warmup must be finite and >= 0"),
        ("data.tasks.vqa.batch_size=-4", "batch_size must be >= 1"),
        ("data.tasks.vqa.batch_size=0", "batch_size must be >= 1"),
        ("adapters.default.r='8'", r"\.r: expected int, got '8'"),
        ("adapters.default.alpha=big", r"\.alpha: expected float or null, got 'big'"),
        ("eval.max_records=lots", "eval.max_records: expected int or null, got 'lots'"),
    ]:
        with pytest.raises((ConfigError, DataError), match=message):
            config = load_config(None, [override], data=good)
            run_module.build_router(config)  # task settings are checked with the router
    assert load_config(None, ["train.grad_clip=null"], data=good).train.grad_clip is None


def test_resume_without_a_checkpoint_refuses_instead_of_restarting(data, tmp_path):
    """checkpoint_every 0: --resume used to restart at step 0 and overwrite the finished run."""
    from launch.run import RunError

    run(data, tmp_path / "done", steps=2, checkpoint_every=0)
    before = (tmp_path / "done" / "adapters" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(RunError, match="no checkpoint to resume from"):
        run(data, tmp_path / "done", resume=True, steps=2, checkpoint_every=0)
    assert (tmp_path / "done" / "adapters" / "adapter_model.safetensors").read_bytes() == before
    with pytest.raises(RunError, match="holds a run already"):
        run(data, tmp_path / "done", steps=2)


def test_written_files_respect_the_umask(tmp_path):
    import os

    from vlpeft.checkpoint import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644  # readable by collaborators


def test_explicit_targets_are_honoured_or_refused(data):
    """Explicit targets in a launcher adapter set were silently replaced by components × kinds
    while config.yaml still showed them: alone they are honoured, with components/kinds refused."""
    from launch.run import build_model, build_router

    spec = clip_bart_config(data)
    spec["adapters"]["default"] = {
        "method": "lora",
        "r": 2,
        "targets": ["encoder.layers.0.self_attn.q_proj"],
    }
    config = load_config(None, data=spec)
    model = build_model(config, build_router(config))
    assert [p for p, _ in __import__("vlpeft").adapted_layers(model)] == [
        "bart.model.encoder.layers.0.self_attn.q_proj"
    ]
    spec["adapters"]["default"]["components"] = ["encoder"]
    with pytest.raises(ConfigError, match="give either targets .* not both"):
        load_config(None, data=spec)


def test_a_weight_source_that_loads_nothing_is_an_error():
    import vlpeft

    with pytest.raises(ValueError, match="ModifiedResNet arguments, which load no weights"):
        vlpeft.build_model(
            "clip-bart", "tiny", pretrained=True, weights={"vision": "/no/such/file.pt"}
        )
    with pytest.raises(
        ValueError, match=r"weights.visoin \(did you mean 'vision'\?\) names no component"
    ):
        vlpeft.build_model("gpt2-vit", "tiny", pretrained=True, weights={"visoin": "x"})
    vlpeft.build_model(
        "clip-bart", "tiny", weights={"vision": "/no/such/file.pt"}
    )  # unused: logged


def test_resuming_with_a_changed_config_is_refused_unless_allowed(data, tmp_path):
    """train.lr changed on --resume: the old schedule would continue while config.yaml records
    the new lr. Refused with the differing keys; --allow-change accepts and records it; keys that
    only change how the run executes may change."""
    from launch.run import RunError

    run(data, tmp_path / "r")
    with pytest.raises(RunError, match=r"train.lr: 0.01 → 0.02.*--allow-change"):
        run(data, tmp_path / "r", resume=True, lr=2e-2)
    run(data, tmp_path / "r", resume=True, log_every=2)  # execution only: allowed
    config = load_config(None, data=clip_bart_config(data, lr=2e-2))
    train_module.train(config, tmp_path / "r", resume=True, allow_change=["train.lr"])
    history = [
        json.loads(x) for x in (tmp_path / "r" / "config_history.jsonl").read_text().splitlines()
    ]
    assert history[-1]["changes"]["train.lr"] == [0.01, 0.02]
    assert load_config(tmp_path / "r" / "config.yaml").train.lr == 0.02


def test_a_failed_checkpoint_write_is_clear_and_keeps_the_previous_one(data, tmp_path, monkeypatch):
    """A full disk at the second checkpoint (a mocked write failure): a clear error, the first
    checkpoint intact, and --resume from it ends where an uninterrupted run does."""
    import errno

    from launch.run import RunError

    run(data, tmp_path / "whole")
    real = checkpoints_module.write_safetensors

    def full_disk(path, tensors, metadata=None):
        if "step_0000006" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, tensors, metadata)

    monkeypatch.setattr(checkpoints_module, "write_safetensors", full_disk)
    with pytest.raises(
        RunError,
        match=r"step 6: the checkpoint could not be written .*No space left.*step_0000003 is intact",
    ):
        run(data, tmp_path / "full")
    monkeypatch.setattr(checkpoints_module, "write_safetensors", real)
    assert checkpoints_module.damage(tmp_path / "full" / "checkpoints" / "step_0000003") is None
    run(data, tmp_path / "full", resume=True)
    whole = load_file(tmp_path / "whole" / "adapters" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "full" / "adapters" / "adapter_model.safetensors")
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_adam_eps_reaches_the_optimizer(data):
    config = load_config(None, ["train.adam_eps=1e-6"], data=clip_bart_config(data))
    model = run_module.build_model(config, run_module.build_router(config))
    stepper = engine_module.build_stepper(config, model, 1, torch.device("cpu"), 4)
    assert {group["eps"] for group in stepper.optimizer.param_groups} == {1e-6}
    with pytest.raises(ConfigError, match=r"train.adam_eps must be finite and > 0, got 0"):
        load_config(None, ["train.adam_eps=0"], data=clip_bart_config(data))


def test_a_resume_applies_the_configs_eps_and_weight_decay(data):
    """A checkpoint's optimizer state carries the eps and weight decay it was saved with; a
    resume that changes them (--allow-change) gets the config's."""
    old = load_config(None, data=clip_bart_config(data))
    new = load_config(None, ["train.adam_eps=1e-6", "train.weight_decay=0.05"],
                      data=clip_bart_config(data))  # fmt: skip
    model = run_module.build_model(old, run_module.build_router(old))
    saved = engine_module.build_stepper(old, model, 1, torch.device("cpu"), 4).optimizer
    resumed = engine_module.build_stepper(new, model, 1, torch.device("cpu"), 4).optimizer
    resumed.load_state_dict(saved.state_dict())
    assert [g["eps"] for g in resumed.param_groups] == [1e-8, 1e-8]  # what torch restores
    engine_module.apply_optimizer_settings(resumed, new)
    assert [(g["eps"], g["weight_decay"]) for g in resumed.param_groups] == [
        (1e-6, 0.05),
        (1e-6, 0.0),
    ]
