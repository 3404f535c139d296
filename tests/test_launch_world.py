"""The launcher as a user meets it: its loggers (TensorBoard, W&B offline), what a run prints at its
end and how long it trained across resumes, an older config's ``train.tensorboard``, the
leaderboard's headers, validation scores, seed rows and chart, and data roots for the checks."""

import json
import os
import shutil
import time

import pytest
import yaml

import launch.train as train_module
from evaluation import leaderboard
from launch.config import ConfigError, load_config
from tasks import check as check_module
from tasks.synthetic import generate


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, images=24, seed=0, size=32)
    return root


def spec(data, **train):
    return {
        "model": {"family": "clip-bart", "preset": "tiny", "overrides": {"image_size": 32}},
        "adapters": {"default": {"method": "lora", "r": 4, "dropout": 0.0}},
        "data": {"file": str(data / "tasks.yaml"), "tasks": {"vqa": {"batch_size": 4}}},
        "train": {"steps": 4, "lr": 1e-2, "checkpoint_every": 2, "log_every": 1, "loggers": [],
                  **train},
        "eval": {"splits": ["test"], "max_records": 4, "max_new_tokens": 2},
    }  # fmt: skip


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- loggers ---------------------------------------------------------------------------------------
def test_train_tensorboard_of_an_older_config_maps_to_loggers_and_resumes(data, tmp_path):
    """``train.tensorboard: true|false`` (before ``train.loggers``) loads as loggers
    [tensorboard] | []; a run whose config.yaml still says it resumes; both keys disagreeing is an
    error naming both."""
    older = spec(data)
    del older["train"]["loggers"]
    older["train"]["tensorboard"] = False
    assert load_config(None, data=older).train.loggers == []
    older["train"]["tensorboard"] = True
    assert load_config(None, data=older).train.loggers == ["tensorboard"]
    with pytest.raises(ConfigError, match="tensorboard: True contradicts loggers"):
        load_config(None, ["train.loggers=[]"], data=older)

    run_dir = tmp_path / "run"
    train_module.train(load_config(None, data=spec(data, steps=2)), run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["loggers"] == [] and "tensorboard" not in saved["train"]
    saved["train"].pop("loggers")
    saved["train"]["tensorboard"] = False  # as a run of an older vlpeft wrote it
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    config = load_config(None, data=spec(data, steps=4))
    summary = train_module.train(config, run_dir, resume=True, allow_change=["train.steps"])
    assert summary["steps"] == 4 and [m["step"] for m in metrics(run_dir)][-1] == 4


def test_tensorboard_and_wandb_log_the_same_metric_names(data, tmp_path, monkeypatch):
    """With ``loggers: [tensorboard, wandb]`` (W&B offline, its files in the run directory) both
    get metrics.jsonl's names and values; a resumed run continues the same W&B run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    run_dir = tmp_path / "run"
    config = load_config(None, data=spec(data, loggers=["tensorboard", "wandb"]))
    train_module.train(config, run_dir)
    logged = {k for m in metrics(run_dir) for k, v in m.items() if k != "step" and v is not None}
    assert {"train/loss", "train/lr", "test/vqa_accuracy"} <= logged

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == logged

    # W&B's offline record (its protobuf log, read as bytes: keys and JSON values are plain text)
    run_id = (run_dir / "wandb_id").read_text()
    (record,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    deadline = time.time() + 60  # W&B's service process may still be writing its last records
    while not all(key.encode() in record.read_bytes() for key in logged):
        assert time.time() < deadline, "W&B's record lacks metric names"
        time.sleep(0.2)
    written = record.read_bytes()
    for m in metrics(run_dir):
        if m.get("train/loss") is not None:
            assert json.dumps(m["train/loss"]).encode() in written

    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")
    for name in ("adapters", "run.json"):
        (shutil.rmtree if (resumed / name).is_dir() else os.remove)(resumed / name)
    train_module.train(config, resumed, resume=True)
    assert (resumed / "wandb_id").read_text() == run_id
    assert len(list((resumed / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1


# -- the end of a run ------------------------------------------------------------------------------
def test_a_run_prints_its_end_and_counts_its_time_across_resumes(data, tmp_path, capsys):
    """``launch.train`` ends with the run directory, the scores and the time; ``train_seconds``
    is the whole run's: a resumed run adds the time its checkpoint had counted."""
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(spec(data)))
    run_dir = tmp_path / "run"
    summary = train_module.main(["--config", str(config_file), "--out", str(run_dir)])
    out = capsys.readouterr().out
    assert f"finished {run_dir}: 4 steps in " in out
    assert f"vqa/test: {summary['results']['vqa/test']:.2f}" in out
    assert str(run_dir / "run.json") in out
    state = json.loads((run_dir / "checkpoints" / "step_0000002" / "state.json").read_text())
    assert 0 < state["train_seconds"] <= summary["train_seconds"]

    # the first part of the run took (say) an hour: the resumed run's total includes it
    shutil.rmtree(run_dir / "checkpoints" / "step_0000004")
    path = run_dir / "checkpoints" / "step_0000002" / "state.json"
    state["train_seconds"] = 3600.0
    path.write_text(json.dumps(state))
    manifest = run_dir / "checkpoints" / "step_0000002" / "manifest.json"
    from launch.checkpoints import manifest as make_manifest

    manifest.write_text(json.dumps(make_manifest(manifest.parent)))
    resumed = train_module.main(["--config", str(config_file), "--out", str(run_dir), "--resume"])
    assert 3600 <= resumed["train_seconds"] < 3600 + 600  # (without it: a fraction of a second)
    assert json.loads((run_dir / "run.json").read_text())["train_seconds"] >= 3600


def test_help_names_the_module_to_run(capsys):
    with pytest.raises(SystemExit):
        train_module.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m launch.train")


def test_a_demo_config_without_its_data_says_what_to_run(tmp_path, monkeypatch):
    """The demo configs read .demo/ (what `make demo` writes): without it the error says so."""
    monkeypatch.chdir(tmp_path)
    config = load_config(train_module.Path(train_module.__file__).parent / "configs/demo_blip.yaml")
    with pytest.raises(
        ConfigError, match=r"data.file .*\.demo/data/tasks.yaml: not found.*make demo"
    ):
        train_module.train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- the leaderboard -------------------------------------------------------------------------------
def fake_run(folder, name, results, metrics=None, evals=()):
    """A finished run's run.json (and eval/<task>_<split>.json records)."""
    folder.mkdir(parents=True)
    summary = {"run": name, "method": "lora", "family": "clip-bart", "preset": "tiny",
               "trainable": 10, "train_seconds": 1.0, "results": results}  # fmt: skip
    if metrics is not None:
        summary["metrics"] = metrics
    (folder / "run.json").write_text(json.dumps(summary))
    (folder / "eval").mkdir()
    for task, split, metric, headline in evals:
        record = {"task": task, "split": split, "metric": metric, "headline": headline}
        (folder / "eval" / f"{task}_{split}.json").write_text(json.dumps(record))
    return folder


def test_the_leaderboard_names_metrics_seeds_and_reads_val_scores(tmp_path, monkeypatch):
    metrics = {"vqa/test": "accuracy", "caption/test": "CIDEr", "retrieval/test": "r_mean"}
    evals = [("vqa", "val", "accuracy", 41.0), ("caption", "val", "CIDEr", 90.0)]
    a = fake_run(tmp_path / "seed0" / "lora", "lora",
                 {"vqa/test": 50.0, "caption/test": 100.0, "retrieval/test": 60.0}, metrics,
                 evals)  # fmt: skip
    b = fake_run(tmp_path / "seed1" / "lora", "lora",
                 {"vqa/test": 52.0, "caption/test": None, "retrieval/test": 62.0}, metrics)  # fmt: skip
    out = tmp_path / "board.md"
    markdown = leaderboard.main([str(a), str(b), "--out", str(out)])
    header = markdown.splitlines()[0]
    assert "| caption CIDEr | retrieval recall | vqa acc | average |" in header
    assert "| seed0/lora |" in markdown and "| seed1/lora |" in markdown
    assert (
        (tmp_path / "board.csv")
        .read_text()
        .splitlines()[0]
        .endswith("caption CIDEr,retrieval recall,vqa acc,average")
    )
    # --split val: the scores of run.json's eval/*_val.json (run.json has none of val)
    val = leaderboard.main([str(a), "--out", str(tmp_path / "val.md"), "--split", "val"])
    assert "| caption CIDEr | vqa acc |" in val and "| 90.00 | 41.00 | 65.50 |" in val

    # the chart: a panel per kind of metric, value labels, the missing CIDEr marked missing
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    leaderboard.plot([leaderboard.load_summary(a), leaderboard.load_summary(b)],
                     tmp_path / "chart.png")  # fmt: skip
    (figure,) = figures
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["test: CIDEr", "test: recall (mean R@1/5/10)", "test: accuracy",
                      "test: average (columns every row has)"]  # fmt: skip
    texts = {ax.get_title(): [t.get_text() for t in ax.texts] for ax in figure.axes}
    assert "100.0" in texts["test: CIDEr"] and "missing" in texts["test: CIDEr"]
    assert "missing" not in texts["test: accuracy"]
    assert {"50.0", "52.0"} <= set(texts["test: accuracy"])
    (cider,) = [ax for ax in figure.axes if ax.get_title() == "test: CIDEr"]
    assert [p.get_height() for p in cider.patches] == [100.0, 0.0]  # no bar for the missing one


# -- data roots ------------------------------------------------------------------------------------
def test_tasks_check_takes_a_data_root(data, tmp_path, capsys):
    """The task file elsewhere than its data: its relative paths resolve against --root or
    data.root=, as training's data.root."""
    moved = tmp_path / "tasks.yaml"
    shutil.copy(data / "tasks.yaml", moved)
    assert check_module.main([str(moved), "--tasks", "vqa"]) == 1
    assert "problem(s)" in capsys.readouterr().out
    assert check_module.main([str(moved), "--tasks", "vqa", "--root", str(data)]) == 0
    assert check_module.main([str(moved), "--tasks", "vqa", f"data.root={data}"]) == 0
    assert "no problems found" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        check_module.main([str(moved), "train.steps=3"])
