"""The training pipeline's knobs change nothing but speed and memory: data-loading workers, gradient
accumulation, gradient checkpointing, an explicit device; and fp16's loss scaler resumes."""

import json

import pytest
import torch
from safetensors.torch import load_file

import launch.distributed as distributed_module
import launch.engine as engine_module
import launch.run as run_module
import launch.train as train_module
from launch.config import ConfigError, load_config
from tasks.loader import multitask_loader
from tasks.router import TaskRouter
from tasks.sampler import MultitaskSampler
from tasks.synthetic import generate
from vlpeft.models import build_model

NO_DROPOUT = {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, images=40, seed=0, size=32)
    return root


def config(data, tasks=None, text=None, dropout=0.1, **train):
    overrides = {"image_size": 32, **({"text": text} if text else {})}
    return {
        "model": {"family": "clip-bart", "preset": "tiny", "overrides": overrides},
        "adapters": {"default": {"method": "lora", "r": 4, "routing": "mul", "dropout": dropout}},
        "data": {"file": str(data / "tasks.yaml"),
                 "tasks": tasks or {"vqa": {"batch_size": 4}, "gqa": {"batch_size": 4},
                                    "nlvr2": {"batch_size": 2}}},
        "train": {"steps": 6, "lr": 1e-2, "checkpoint_every": 3, "log_every": 1,
                  "tensorboard": False, **train},
        "eval": {"splits": []},
    }  # fmt: skip


def adapters(run_dir):
    return load_file(run_dir / "adapters" / "adapter_model.safetensors")


def train(data, out, resume=False, **kw):
    return train_module.train(load_config(None, data=config(data, **kw)), out, resume=resume)


def test_the_loader_yields_the_sampler_steps_with_their_positions(data):
    router = TaskRouter.from_yaml(data / "tasks.yaml", only=["vqa", "nlvr2"])
    model = build_model("clip-bart", "tiny", image_size=32)
    datasets = {n: router.dataset(n, "train", model) for n in router.tasks}
    sampler = MultitaskSampler({n: len(d) for n, d in datasets.items()}, {"vqa": 3, "nlvr2": 2})
    expected = [(t, i) for e in (0, 1) for t, i in sampler.epoch(e)]
    steps = len(list(sampler.epoch(0)))
    seen = []
    for (epoch, step), task, batch in multitask_loader(datasets, sampler, (0, 2), num_workers=2):
        seen.append((epoch, step, task, batch["ids"]))
        if len(seen) == steps:  # into the next epoch
            break
    assert [(e, s) for e, s, _, _ in seen][:2] == [(0, 3), (0, 4)]
    assert seen[-1][:2] == (1, 2)  # the epoch's last step is counted, then the next epoch's
    for (_, _, task, ids), (want_task, indices) in zip(seen, expected[2:]):
        assert task == want_task
        assert ids == [datasets[task].records[i]["id"] for i in indices]


def test_workers_change_nothing_and_resume_with_workers_is_exact(data, tmp_path, monkeypatch):
    """Bit-identical adapters with 0 and 2 workers (dropout on: the workers leave the training
    RNG alone), and a run with workers killed mid-way and resumed equals the uninterrupted one."""
    train(data, tmp_path / "w0", num_workers=0)
    train(data, tmp_path / "w2", num_workers=2)
    real_step, calls = engine_module.train_step, {"n": 0}

    def dying_step(run, micro_batches):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 5, after the step-3 checkpoint; workers have prefetched
            raise KeyboardInterrupt("killed")
        return real_step(run, micro_batches)

    monkeypatch.setattr(engine_module, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(data, tmp_path / "killed", num_workers=2)
    monkeypatch.setattr(engine_module, "train_step", real_step)
    train(data, tmp_path / "killed", resume=True, num_workers=2)
    plain = adapters(tmp_path / "w0")
    for other in ("w2", "killed"):
        got = adapters(tmp_path / other)
        assert got.keys() == plain.keys()
        for key in plain:
            assert torch.equal(got[key], plain[key]), (other, key)


def test_grad_accum_trains_as_the_larger_batch(data, tmp_path):
    """One task, dropout off: batch 4 × 2 accumulated micro-batches = batch 8 (the same examples
    per optimizer step, per-example mean losses); train.steps counts optimizer steps."""
    one = {"vqa": {"batch_size": 8}}
    accumulated = {"vqa": {"batch_size": 4}}
    big = train(data, tmp_path / "big", tasks=one, text=NO_DROPOUT, dropout=0.0, steps=3)
    small = train(
        data, tmp_path / "acc", tasks=accumulated, text=NO_DROPOUT, dropout=0.0, steps=3,
        grad_accum=2,
    )  # fmt: skip
    assert big["steps"] == small["steps"] == 3
    a, b = adapters(tmp_path / "big"), adapters(tmp_path / "acc")
    moved = adapters(tmp_path / "big")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    # a pass of 14 records ends in a short batch: 8 + 6 with batch 8, (4 + 4) + (4 + 2) accumulated
    short = {"vqa": {"batch_size": 8, "max_records": 14}}
    train(data, tmp_path / "big14", tasks=short, text=NO_DROPOUT, dropout=0.0, steps=4)
    short_acc = {"vqa": {"batch_size": 4, "max_records": 14}}
    train(data, tmp_path / "acc14", tasks=short_acc, text=NO_DROPOUT, dropout=0.0, steps=4,
          grad_accum=2)  # fmt: skip
    a14, b14 = adapters(tmp_path / "big14"), adapters(tmp_path / "acc14")
    for key in a14:
        torch.testing.assert_close(b14[key], a14[key], rtol=1e-4, atol=1e-6)
    # and not trivially: without accumulation the small batch trains differently
    train(data, tmp_path / "no", tasks=accumulated, text=NO_DROPOUT, dropout=0.0, steps=3)
    other = adapters(tmp_path / "no")
    assert any(not torch.allclose(other[k], moved[k], atol=1e-5) for k in moved)


def test_gradient_checkpointing_trains_as_without(data, tmp_path, monkeypatch):
    train(data, tmp_path / "plain", steps=3)
    calls = []
    real = run_module.enable_gradient_checkpointing
    monkeypatch.setattr(
        run_module,
        "enable_gradient_checkpointing",
        lambda m: calls.append((m, real(m))) or calls[-1][1],
    )
    train(data, tmp_path / "ckpt", steps=3, gradient_checkpointing=True)
    model, parts = calls[0]
    assert parts == ["bart"] and model.bart.is_activation_checkpointing
    plain, ckpt = adapters(tmp_path / "plain"), adapters(tmp_path / "ckpt")
    for key in plain:  # non-reentrant recomputes replay the dropout masks
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-5, atol=1e-6)


def test_an_explicit_device_runs_the_plain_loop_there(data, tmp_path, monkeypatch):
    seen = []
    real = distributed_module.to_device

    def spy(batch, device):
        seen.append(device)
        return real(batch, device)

    monkeypatch.setattr(distributed_module, "to_device", spy)
    summary = train(data, tmp_path / "cpu", steps=2, device="cpu")
    assert summary["steps"] == 2 and seen and all(d == torch.device("cpu") for d in seen)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device 'cuda:0': no CUDA device"):
            train(data, tmp_path / "gpu", steps=2, device="cuda:0")
    with pytest.raises(ConfigError, match=r"train.device must be auto, cpu, cuda or cuda:N"):
        load_config(None, data=config(data, device="gpu"))


def test_fp16_resumes_exactly_with_its_loss_scaler(data, tmp_path, monkeypatch):
    """fp16 in the plain loop: killed after the step-2 checkpoint and resumed, the adapters equal
    an uninterrupted run's (the scaler's scale and growth tracker are checkpointed)."""
    train(data, tmp_path / "whole", steps=4, checkpoint_every=2, precision="fp16")
    state = json.loads(
        (tmp_path / "whole" / "checkpoints" / "step_0000002" / "state.json").read_text()
    )
    assert state["scaler"]["scale"] == 65536.0 and state["scaler"]["_growth_tracker"] == 2
    real_step, calls = engine_module.train_step, {"n": 0}

    def dying_step(run, micro_batches):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_step(run, micro_batches)

    monkeypatch.setattr(engine_module, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(data, tmp_path / "cut", steps=4, checkpoint_every=2, precision="fp16")
    monkeypatch.setattr(engine_module, "train_step", real_step)
    train(data, tmp_path / "cut", resume=True, steps=4, checkpoint_every=2, precision="fp16")
    whole, cut = adapters(tmp_path / "whole"), adapters(tmp_path / "cut")
    for key in whole:
        assert torch.equal(whole[key], cut[key]), key


def test_fp16_overflows_hold_the_schedule_and_a_collapsing_scale_stops(data, tmp_path, monkeypatch):
    """An initial scale of 1e38 overflows every fp16 gradient: each such step is skipped by the
    scaler, counted, and leaves the learning rate where it was (as DeepSpeed's fp16 does); a
    scale driven below the floor is a non-finite run, stopped with the error naming it."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: real(device, init_scale=1e38))
    train(data, tmp_path / "over", steps=3, precision="fp16", warmup=0)
    lines = [json.loads(x) for x in (tmp_path / "over" / "metrics.jsonl").read_text().splitlines()]
    assert [x["train/overflow_skipped"] for x in lines] == [1, 2, 3]
    assert all(x["train/lr"] == 1e-2 for x in lines)  # linear decay would have moved it
    monkeypatch.setattr(
        engine_module, "MIN_LOSS_SCALE", 1e37
    )  # steps 1–5 at 1e38, 5e37, …, 6.25e36
    with pytest.raises(engine_module.NonFiniteError, match=r"step 5 .*loss scale 6.25e\+36"):
        train(data, tmp_path / "collapse", steps=6, precision="fp16")


def test_accumulated_batches_weigh_by_their_examples():
    def batch(n):
        return {"ids": list(range(n))}

    weights = engine_module.micro_batch_weights
    assert weights([("vqa", batch(4)), ("vqa", batch(2))]) == pytest.approx([4 / 6, 2 / 6])
    assert weights([("vqa", batch(4)), ("gqa", batch(2))]) == pytest.approx([0.5, 0.5])
    got = weights([("vqa", batch(4)), ("vqa", batch(2)), ("gqa", batch(3))])
    assert got == pytest.approx([2 / 3 * 4 / 6, 2 / 3 * 2 / 6, 1 / 3])


def test_deepspeed_accumulation_is_filled_or_must_agree(tmp_path):
    from launch.config import TrainConfig

    cfg = TrainConfig.from_dict({"train": {"grad_accum": 4, "precision": "fp16"}})
    ds = engine_module.deepspeed_config(cfg, world=2, micro=8)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 8 * 4 * 2
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False
    mine = tmp_path / "ds.json"
    mine.write_text(json.dumps({"gradient_accumulation_steps": 2}))
    cfg.deepspeed.config = str(mine)
    with pytest.raises(
        ConfigError, match=r"gradient_accumulation_steps is 2 but train.grad_accum is 4"
    ):
        engine_module.deepspeed_config(cfg, world=1)
    mine.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match=r"bf16.enabled is True but train.precision is 'fp16'"):
        engine_module.deepspeed_config(cfg, world=1)


def test_a_cached_features_run_equals_the_pixel_run(data, tmp_path, monkeypatch):
    """``launch.features`` builds one cache for two tasks (resuming after an interruption, to the
    same tensors as an uninterrupted build); a run reading it trains as the run from pixels."""
    import yaml

    import tasks.features as features
    from launch import features as build

    tasks = {"vqa": {"batch_size": 4}, "nlvr2": {"batch_size": 2}}
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump(config(data, tasks=tasks, steps=3)))
    args = ["--config", str(file), "--shard-images", "16"]
    assert build.main([*args, "--out", str(tmp_path / "whole")]) == 0
    real, calls = features.write_json, {"n": 0}

    def dying(path, index):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        real(path, index)

    monkeypatch.setattr(features, "write_json", dying)
    with pytest.raises(KeyboardInterrupt):
        build.main([*args, "--out", str(tmp_path / "cut")])
    monkeypatch.setattr(features, "write_json", real)
    with pytest.raises(Exception, match="incomplete"):
        features.FeatureCache(tmp_path / "cut")
    assert build.main([*args, "--out", str(tmp_path / "cut")]) == 0
    whole, cut = features.FeatureCache(tmp_path / "whole"), features.FeatureCache(tmp_path / "cut")
    assert whole.keys.keys() == cut.keys.keys() and len(whole.shards) > 2
    for key in whole.keys:
        assert torch.equal(whole[key], cut[key]), key
    train(data, tmp_path / "pixels", tasks=tasks, steps=3)
    cached = {t: {**s, "features": str(tmp_path / "whole")} for t, s in tasks.items()}
    seen, to_device = [], distributed_module.to_device
    monkeypatch.setattr(
        distributed_module, "to_device", lambda b, d: seen.append(set(b)) or to_device(b, d)
    )
    train(data, tmp_path / "cached", tasks=cached, steps=3, num_workers=2)
    assert seen and all("features" in keys and "images" not in keys for keys in seen)
    a, b = adapters(tmp_path / "pixels"), adapters(tmp_path / "cached")
    for key in a:  # the CNN batched differently: float-level
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_the_gpu_smoke_check_runs_its_whole_path_on_the_cpu():
    """bench.gpu_smoke --tiny: the GPU check's path (both families, workers config, bf16,
    evaluation) with tiny models, so the script stays ready for a GPU."""
    from bench import gpu_smoke

    rows = gpu_smoke.main(["--tiny", "--steps", "2"])
    assert [r["model"] for r in rows] == ["clip-bart", "blip"]
    for row in rows:
        assert row["steps"] >= 2 and 0 <= row["data_wait"] <= 1 and row["results"]


def test_train_compile_changes_nothing_but_speed(data, tmp_path, caplog):
    """train.compile (aot_eager here: no C++ compiler needed) trains as eager; an unknown backend
    falls back to eager with a warning saying why."""
    train(data, tmp_path / "eager", steps=2)
    caplog.set_level("INFO")
    train(data, tmp_path / "compiled", steps=2, compile=True, compile_backend="aot_eager")
    assert "adapters compiled with aot_eager" in caplog.text
    eager, compiled = adapters(tmp_path / "eager"), adapters(tmp_path / "compiled")
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-6)
    train(data, tmp_path / "fallback", steps=1, compile=True, compile_backend="no_such_backend")
    assert "unknown torch.compile backend 'no_such_backend'" in caplog.text


@pytest.mark.parametrize("family,task", [("roberta-vit", "vqa"), ("gpt2-vit", "caption")])
def test_vit_families_train_from_cached_features_as_from_pixels(data, tmp_path, family, task):
    """The frozen ViT's [CLS] feature (x_R of the routed adapters too) cached and read back:
    the same training; an adapter inside the ViT makes its features uncacheable, said so."""
    from launch.features import build_cache
    from tasks.base import DataError

    spec = config(data, tasks={task: {"batch_size": 4}}, steps=3)
    spec["model"] = {"family": family, "preset": "tiny", "overrides": {}}
    build_cache(load_config(None, data=spec), tmp_path / "cache")
    train_module.train(load_config(None, data=spec), tmp_path / "pixels")
    cached = {
        **spec,
        "data": {
            **spec["data"],
            "tasks": {task: {"batch_size": 4, "features": str(tmp_path / "cache")}},
        },
    }
    train_module.train(load_config(None, data=cached), tmp_path / "cached")
    a, b = adapters(tmp_path / "pixels"), adapters(tmp_path / "cached")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    spec["adapters"]["default"] = {"method": "lora", "r": 4, "components": ["vision"]}
    with pytest.raises(DataError, match=r"adapters in the visual encoder \(vit\."):
        build_cache(load_config(None, data=spec), tmp_path / "other")
    noisy = config(data, tasks={task: {"batch_size": 4}}, steps=3)
    noisy["model"] = {"family": family, "preset": "tiny",
                      "overrides": {"vision": {"attention_probs_dropout_prob": 0.5}}}  # fmt: skip
    with pytest.raises(DataError, match=r"applies dropout in training"):  # functional dropout too
        build_cache(load_config(None, data=noisy), tmp_path / "noisy")
    if family == "gpt2-vit":  # generation needs neither text nor ids: images or features alone
        from vlpeft.models import build_model

        model = build_model(family, "tiny").eval()
        features = model.visual_features(
            torch.randn(2, 3, model.config.image_size, model.config.image_size)
        )
        assert len(model.generate({"features": features}, max_new_tokens=2)) == 2


def test_the_record_cache_changes_nothing_that_trains(data, tmp_path):
    """Records parsed from the JSON (data.cache_dir: off) against the record cache, cold with 2
    workers and warm with none: bit-identical adapters (dropout on), and the cache is where the
    config says, one folder per cached split."""
    cache = tmp_path / "cache"

    def run(name, cache_dir, workers):
        spec = config(data, num_workers=workers)
        spec["data"]["cache_dir"] = cache_dir
        train_module.train(load_config(None, data=spec), tmp_path / name)
        return adapters(tmp_path / name)

    parsed = run("json", "off", 0)
    cold = run("cold", str(cache), 2)
    assert len([p for p in cache.iterdir() if p.is_dir()]) >= 5  # official VQA, GQA, NLVR², picks
    warm = run("warm", str(cache), 0)
    for key in parsed:
        assert torch.equal(cold[key], parsed[key]), key
        assert torch.equal(warm[key], parsed[key]), key
