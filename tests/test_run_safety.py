"""No lost run (issue #25): what ``--out`` may name, one process per run directory, restarts,
structural changes on resume, skipped-step limits, and the non-finite and fp16 properties of the
step (each a case that failed or was untested before)."""

import contextlib
import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

import launch.engine as engine_module
import launch.reproduce as reproduce
import launch.train as train_module
from launch.config import RunError, load_config
from launch.resume import LOCK, MARKER, folder_lock
from tasks.synthetic import generate


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, images=24, seed=0, size=32)
    return root


def spec(data, tasks=None, **train):
    return {
        "model": {"family": "clip-bart", "preset": "tiny", "overrides": {"image_size": 32}},
        "adapters": {"default": {"method": "lora", "r": 4}},
        "data": {"file": str(data / "tasks.yaml"), "tasks": tasks or {"vqa": {"batch_size": 4}}},
        "train": {"steps": 3, "lr": 1e-2, "checkpoint_every": 0, "log_every": 1,
                  "tensorboard": False, **train},
        "eval": {"splits": []},
    }  # fmt: skip


def run(data, out, resume=False, allow_change=(), **train):
    config = load_config(None, data=spec(data, **train))
    return train_module.train(config, out, resume=resume, allow_change=allow_change)


def adapters(run_dir):
    return load_file(run_dir / "adapters" / "adapter_model.safetensors")


@contextlib.contextmanager
def killed_at_step(monkeypatch, step: int):
    """Ctrl-C during the ``step``-th optimisation step of the block (the step before it done)."""
    real, calls = engine_module.train_step, {"n": 0}

    def dying_step(run_, micro_batches):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt("killed")
        return real(run_, micro_batches)

    monkeypatch.setattr(engine_module, "train_step", dying_step)
    try:
        yield
    finally:
        monkeypatch.setattr(engine_module, "train_step", real)


# -- what --out may name -------------------------------------------------------------------------
def test_a_folder_that_is_not_a_run_is_never_overwritten(data, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own file\n")
    with pytest.raises(RunError, match=r"not a vlpeft run and not empty .*'config.yaml'"):
        run(data, mine)
    assert (mine / "config.yaml").read_text() == "my own file\n"
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match=r"--out .*file: a file, not a folder"):
        run(data, tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(data, empty)["steps"] == 3  # an empty folder is fine
    assert json.loads((empty / MARKER).read_text())["format"] == 1


def test_a_run_from_before_the_marker_still_resumes(data, tmp_path):
    run(data, tmp_path / "old", checkpoint_every=1, steps=2)
    (tmp_path / "old" / MARKER).unlink()  # as vlpeft wrote runs before the marker
    summary = run(data, tmp_path / "old", True, ["train.steps"], checkpoint_every=1, steps=3)
    assert summary["steps"] == 3


def test_a_run_of_another_format_is_refused_naming_the_marker(data, tmp_path):
    run(data, tmp_path / "r", checkpoint_every=1, steps=2)
    (tmp_path / "r" / MARKER).write_text(json.dumps({"format": 99}))
    with pytest.raises(
        RunError, match=r"\.vlpeft_run: format is 99, this vlpeft reads run format 1"
    ):
        run(data, tmp_path / "r", resume=True, checkpoint_every=1, steps=3)


def test_one_process_at_a_time_trains_into_a_run_directory(data, tmp_path):
    """A second process on the same --out is refused at once (the lock is held for the whole
    run), naming the holder; once it is released the folder trains."""
    out = tmp_path / "busy"
    with folder_lock(out, "training"):
        assert (out / LOCK).read_text() == str(os.getpid())
        with pytest.raises(RunError, match=rf"another process \(pid {os.getpid()}\) is training"):
            run(data, out)
    assert run(data, out)["steps"] == 3


def test_one_process_at_a_time_builds_a_feature_cache(data, tmp_path):
    from launch.features import build_cache

    config = load_config(None, data=spec(data))
    with folder_lock(tmp_path / "cache", "building a feature cache"):
        with pytest.raises(RunError, match=r"another process .* building a feature cache"):
            build_cache(config, tmp_path / "cache", splits=["val"])
    assert build_cache(config, tmp_path / "cache", splits=["val"]) == tmp_path / "cache"


def test_reproduce_restarts_a_seed_killed_before_its_first_checkpoint(data, tmp_path, monkeypatch):
    """A seed's run killed before any checkpoint left config.yaml and metrics.jsonl: reproduce
    reruns it from scratch (with its options after the overrides) and it equals a clean run."""
    recipe = {**spec(data), "paper": {"source": "A", "table": "T", "results": {}}}
    recipe["data"]["file"] = str(data / "tasks.yaml")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with killed_at_step(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        reproduce.main([str(path), "--out", str(tmp_path / "out")])
    seed_run = tmp_path / "out" / "seed0" / "run"
    assert (seed_run / "metrics.jsonl").is_file() and not (seed_run / "checkpoints").exists()
    assert reproduce.main([str(path), "train.log_every=1", "--out", str(tmp_path / "out")]) == 0
    run(data, tmp_path / "clean")
    clean, again = adapters(tmp_path / "clean"), adapters(seed_run)
    for key in clean:
        assert torch.equal(clean[key], again[key]), key


@pytest.mark.parametrize(
    "changes",
    [["adapters.default.r=8"], ["adapters.default.method=dora"],
     ["model.family=gpt2-vit", "model.overrides={}"]],
)  # fmt: skip
def test_no_allow_change_takes_a_change_of_the_tensors(data, tmp_path, changes):
    """The checkpoint holds the old rank's, method's or family's tensors: refused with the
    reason, whatever --allow-change says, before the model is built."""
    run(data, tmp_path / "r", checkpoint_every=1, steps=2)
    key = changes[0].split("=")[0]
    config = load_config(None, [*changes, "train.steps=3", "train.checkpoint_every=1"],
                         data=spec(data))  # fmt: skip
    with pytest.raises(RunError, match=rf"{key}: .*no --allow-change can take it"):
        train_module.train(config, tmp_path / "r", resume=True, allow_change=[key, "train.steps"])


# -- non-finite steps ----------------------------------------------------------------------------
def infinite_after(monkeypatch, first_bad: int, last_bad: int = 10**9):
    """The loss of the model's forward calls first_bad..last_bad (1-based) is +inf (not NaN)."""
    real, calls = engine_module.forward_loss, {"n": 0}

    def forward(run, task, batch):
        calls["n"] += 1
        loss, penalty = real(run, task, batch)
        if first_bad <= calls["n"] <= last_bad:
            loss = loss * float("inf")
        return loss, penalty

    monkeypatch.setattr(engine_module, "forward_loss", forward)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_an_infinite_loss_stops_or_skips_the_step(data, tmp_path, monkeypatch, precision):
    infinite_after(monkeypatch, 2, 2)
    with pytest.raises(engine_module.NonFiniteError, match=r"step 2 \(task vqa\): the loss is inf"):
        run(data, tmp_path / "stop", precision=precision)
    infinite_after(monkeypatch, 2, 2)
    summary = run(data, tmp_path / "skip", precision=precision, on_nonfinite="skip")
    assert summary["steps"] == 3 and summary["steps_skipped"] == 1


def test_skipped_steps_keep_the_schedule_and_too_many_are_an_error(data, tmp_path, monkeypatch):
    """After k skipped steps the learning rate is the schedule's value at step k (the schedule
    advances; a skipped step counts); a run that skipped more than train.max_skipped_share of
    its steps is an error and writes no run.json."""
    infinite_after(monkeypatch, 1, 2)
    run(data, tmp_path / "skip", steps=4, warmup=0, on_nonfinite="skip")
    logged = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    lr = [x["train/lr"] for x in logged if "train/lr" in x]
    assert lr == pytest.approx([1e-2 * (4 - k) / 4 for k in (1, 2, 3, 4)])
    assert [x["train/loss"] for x in logged][:2] == [None, None]  # the skipped steps
    infinite_after(monkeypatch, 1)
    with pytest.raises(engine_module.NonFiniteError, match=r"3 of the run's 4 steps skipped"):
        run(data, tmp_path / "all", steps=4, on_nonfinite="skip")
    assert not (tmp_path / "all" / "run.json").exists()
    infinite_after(monkeypatch, 1)
    summary = run(data, tmp_path / "allowed", steps=4, on_nonfinite="skip", max_skipped_share=1.0)
    assert summary["steps_skipped"] == 4


@pytest.mark.parametrize("clip", [None, 0.05])
def test_the_fp16_stepper_with_accumulation_takes_the_fp32_step(clip):
    """The loss scaler's step on N accumulated micro-batches: the gradients are unscaled once,
    after the last one, then clipped — so the update is the plain fp32 step's, exactly (the scale
    is a power of two and the arithmetic float32: scaling and unscaling are exact). A scale left
    in the gradients, unscaling per micro-batch, or clipping the scaled gradients all differ.
    SGD (lr 1) makes the update the gradient itself, which Adam's normalisation would hide."""
    inputs = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1))
    weights = [0.75, 0.25]

    def stepped(make):
        model = torch.nn.Linear(6, 3)
        torch.nn.init.normal_(model.weight, generator=torch.Generator().manual_seed(2))
        torch.nn.init.zeros_(model.bias)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        stepper = make(model, optimizer, schedule)
        for x, weight in zip(inputs, weights):
            stepper.backward(model(x).square().mean(), weight, len(weights))
        assert stepper.update() is None
        return model.weight.detach().clone()

    plain = stepped(lambda m, o, s: engine_module.PlainStepper(m, o, s, clip))
    scaled = stepped(
        lambda m, o, s: engine_module.ScalerStepper(m, o, s, clip, torch.device("cpu"))
    )
    assert scaled.abs().sum() > 0 and not torch.equal(plain, torch.zeros_like(plain))
    assert torch.equal(scaled, plain)


def test_a_split_without_answers_is_evaluated_at_the_end_of_training(tmp_path):
    """VQA test-dev (questions only, as nulllora_tab2_vqav2 evaluates): training ends with the
    server's submission file, run.json (its score None) and the leaderboard (–)."""
    import shutil

    generate(tmp_path / "data", images=24, seed=0, size=32)
    root, images = tmp_path / "data" / "vqa", tmp_path / "data" / "coco" / "images"
    val = json.loads((root / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    questions = val["questions"][:4]
    (root / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(
        json.dumps({"questions": questions})
    )
    (images / "test2015").mkdir()
    for q in questions:
        name = f"COCO_val2014_{q['image_id']:012d}.jpg"
        shutil.copy(
            images / "val2014" / name, images / "test2015" / name.replace("val2014", "test2015")
        )
    splits = {"train": "karpathy_train", "val": "karpathy_val", "test": "test-dev2015"}
    config = spec(tmp_path / "data", {"vqa": {"batch_size": 4, "splits": splits}}, steps=2)
    config["eval"] = {"splits": ["test"], "max_new_tokens": 2}
    summary = train_module.train(load_config(None, data=config), tmp_path / "run")
    assert summary["results"] == {"vqa/test": None}
    assert json.loads((tmp_path / "run" / "run.json").read_text())["results"]["vqa/test"] is None
    assert "| – |" in (tmp_path / "run" / "leaderboard.md").read_text()
    submitted = tmp_path / "run" / "eval" / "vqa_OpenEnded_mscoco_test-dev2015_vlpeft_results.json"
    assert len(json.loads(submitted.read_text())) == len(questions)


def test_the_leaderboard_never_averages_different_evaluations(data, tmp_path):
    """Runs scored on the test split, on a one-record subset of it, and on val renamed test:
    run.json records what each score was computed on, and the leaderboard gives each evaluation
    its own column (named by the data set's split and record count); only the same one shares a
    column and the average."""
    from evaluation.leaderboard import load_summary, rows

    def scored(name, eval_section, tasks=None):
        config = spec(data, tasks, steps=1)
        config["eval"] = {"splits": ["test"], "max_new_tokens": 2, **eval_section}
        train_module.train(load_config(None, data=config), tmp_path / name)
        return load_summary(tmp_path / name)

    full = scored("full", {"max_records": 6})
    again = scored("again", {"max_records": 6})
    subset = scored("subset", {"max_records": 1})
    splits = {"train": "karpathy_train", "val": "karpathy_val", "test": "karpathy_val"}
    renamed = scored("renamed", {"max_records": 6}, {"vqa": {"batch_size": 4, "splits": splits}})
    data_of = full["evaluations"]["vqa/test"]
    assert data_of["split_name"] == "karpathy_test" and data_of["records"] == 6
    assert data_of["max_records"] == 6 and len(data_of["files"]) == 1
    (info,) = data_of["files"].values()
    assert set(info) == {"bytes", "mtime", "head_tail_sha256"}
    names, table = rows([full, again])
    assert names == ["vqa"] and table[0]["average"] == table[0]["vqa"]
    names, table = rows([full, again, subset, renamed])
    assert names == ["vqa (karpathy_test, 6)", "vqa (karpathy_test, 1)", "vqa (karpathy_val, 6)"]
    by_run = {row["run"]: row for row in table}
    assert by_run["full"]["vqa (karpathy_test, 6)"] == full["results"]["vqa/test"]
    assert by_run["again"]["vqa (karpathy_test, 6)"] == again["results"]["vqa/test"]
    assert by_run["subset"]["vqa (karpathy_test, 6)"] is None
    assert by_run["subset"]["vqa (karpathy_test, 1)"] == subset["results"]["vqa/test"]
    assert by_run["renamed"]["vqa (karpathy_val, 6)"] == renamed["results"]["vqa/test"]
    assert all(row["average"] is None for row in table)  # no column every row has


# -- one-line errors -----------------------------------------------------------------------------
def test_malformed_overrides_and_config_files_are_one_line_errors(data, tmp_path):
    from launch.config import ConfigError

    good = spec(data)
    for override, message in [
        ("train.steps=!!python/object/apply:os.system [echo]", "not a YAML value"),
        ("train.steps=[1, 2", "not a YAML value"),
        ("train..steps=3", "not a dotted key"),
        ("=3", "not a dotted key"),
        ("train.steps", "expected key=value"),
    ]:
        with pytest.raises(ConfigError, match=rf"override .*{message}"):
            load_config(None, [override], data=good)
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("train: !!python/object/apply:os.system [echo]\n")
    with pytest.raises(ConfigError, match=r"tagged.yaml: malformed YAML or a tag safe loading"):
        load_config(tagged)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"fifo.yaml: file not found \(or not a regular file\)"):
        load_config(fifo)  # not read: it would block
    nested = tmp_path / "ds.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    config = load_config(None, [f"deepspeed.config={nested}"], data=good)
    with pytest.raises(ConfigError, match=r"ds.json: JSON nested too deeply"):
        engine_module.deepspeed_config(config, world=1)


def test_no_run_file_is_written_through_a_symbolic_link(data, tmp_path):
    run(data, tmp_path / "r", checkpoint_every=1, steps=2)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (tmp_path / "r" / "metrics.jsonl").unlink()
    (tmp_path / "r" / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(RunError, match=r"metrics.jsonl: a symbolic link inside the run directory"):
        run(data, tmp_path / "r", True, ["train.steps"], checkpoint_every=1, steps=3)
    assert victim.read_text() == "keep me\n"


def test_the_leaderboard_names_a_run_summary_it_cannot_read(tmp_path):
    from evaluation import leaderboard

    (tmp_path / "run.json").write_text("[" * 100_000)
    with pytest.raises(SystemExit, match=r"run.json: not a run summary"):
        leaderboard.main([str(tmp_path), "--out", str(tmp_path / "lb.md")])


@pytest.mark.parametrize(
    "override, sequence",
    [("eval.max_new_tokens=200", "decoder: generation needs 201 positions, the model has 128"),
     ("model.overrides.max_text_length=150", "encoder: text \\+ visual tokens needs 154")],
)  # fmt: skip
def test_texts_longer_than_the_model_positions_are_refused_before_training(
    data, tmp_path, override, sequence, capsys
):
    """The tiny BART has 128 positions: a generation or a text that needs more is refused by
    --validate and by training, before the first step (it used to fail mid-run)."""
    from launch.config import ConfigError
    from launch.run import validate_config

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(spec(data)))
    with pytest.raises(ConfigError, match=rf"clip-bart/tiny: {sequence}"):
        validate_config(path, [override])
    with pytest.raises(ConfigError, match=rf"clip-bart/tiny: {sequence}"):
        train_module.train(load_config(path, [override]), tmp_path / "r")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
    validate_config(path)  # the defaults fit
    assert "valid" in capsys.readouterr().out


def test_a_same_size_one_byte_change_of_a_checkpoint_is_detected_and_resume_falls_back(
    data, tmp_path, monkeypatch
):
    """A run killed during step 4 left checkpoints 2 and 3; one byte of step 3's tensors is
    changed in place (the size stays): the checksum catches it, step 3 is moved aside, and the
    resume from step 2 ends where an uninterrupted run does."""
    run(data, tmp_path / "whole", steps=4, checkpoint_every=1)
    with killed_at_step(monkeypatch, 4), pytest.raises(KeyboardInterrupt):
        run(data, tmp_path / "cut", steps=4, checkpoint_every=1)
    newest = tmp_path / "cut" / "checkpoints" / "step_0000003"
    tensors = newest / "trainable.safetensors"
    raw = bytearray(tensors.read_bytes())
    raw[-5] ^= 0x01  # the last tensor's data: still a loadable file of the same size
    tensors.write_bytes(bytes(raw))
    run(data, tmp_path / "cut", resume=True, steps=4, checkpoint_every=1)
    assert (tmp_path / "cut" / "checkpoints" / ".damaged_step_0000003").is_dir()
    whole, cut = adapters(tmp_path / "whole"), adapters(tmp_path / "cut")
    for key in whole:
        assert torch.equal(whole[key], cut[key]), key


def test_a_feature_cache_without_an_eval_split_or_with_a_cut_shard_stops_before_training(
    data, tmp_path
):
    """The cache was built for the train split only: the test split's images are missing, found
    before the first step (it used to be after the training); then a cut shard, likewise."""
    from launch.features import build_cache
    from tasks.base import DataError

    built = load_config(None, data=spec(data))
    cache = build_cache(built, tmp_path / "cache", splits=["train"])
    config = spec(data, {"vqa": {"batch_size": 4, "features": str(cache)}})
    config["eval"] = {"splits": ["test"], "max_new_tokens": 2}
    with pytest.raises(DataError, match=r"no features for image"):
        train_module.train(load_config(None, data=config), tmp_path / "r")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
    config["eval"] = {"splits": []}
    shard = sorted(cache.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(DataError, match=rf"{shard.name}"):
        train_module.train(load_config(None, data=config), tmp_path / "r2")
    assert not (tmp_path / "r2" / "metrics.jsonl").exists()
