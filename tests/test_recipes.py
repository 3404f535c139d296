"""The papers' recipes: every one validates without data or weights, ``--list`` prints the papers'
numbers, ``--check-data`` names what is missing, and a staged recipe reproduces end to end."""

import contextlib
import io
import json
import statistics

import pytest
import yaml

import launch.reproduce as reproduce
from launch.config import ConfigError, load_config
from launch.run import validate_config
from tasks.synthetic import generate


def test_every_recipe_validates_and_cites_its_paper():
    files = reproduce.recipe_files()
    assert len(files) >= 20
    for path in files:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            reports = validate_config(path, ["data.root=/nonexistent"])
        assert "valid" in out.getvalue()
        for _stage, config in reproduce.stage_configs(path, ["data.root=/nonexistent"]):
            results = reproduce.paper_results(config)
            assert config.paper["source"] and config.paper["table"] and results, path
            tasks = set(config.data.tasks)
            for key in results:  # "<task>/<split>": what run.json reports
                task, split = key.split("/")
                assert task in tasks and split in config.eval.splits, (path, key)
        for report in reports.values():
            assert report["sets"] and all(info["layers"] > 0 for info in report["sets"].values())


def test_validate_names_the_problem():
    recipe = reproduce.find_recipe("routing_tab7_lora_proj")
    with pytest.raises(ConfigError, match=r"adapters.default.*r"):
        validate_config(recipe, ["adapters.default.r=0"])
    with pytest.raises(ConfigError, match=r"unknown key 'stpes'"):
        validate_config(recipe, ["train.stpes=3"])
    with pytest.raises(ConfigError, match=r"no stage 'lora'"):
        validate_config(recipe, [], stage="lora")
    blip = reproduce.find_recipe("nulllora_tab1_coco_dora_r32")
    with pytest.raises(ConfigError, match=r"data.tasks.retrieval.features: blip reads no cached"):
        validate_config(blip, ["data.tasks.retrieval.features=/cache"])
    zero3 = ["deepspeed.enabled=true", "deepspeed.config=launch/ds_zero3.json"]
    with pytest.raises(ConfigError, match=r"ZeRO-3 partitions the base weights, and DoRA"):
        validate_config(blip, zero3)
    staged = reproduce.find_recipe("resora_tab1_flickr30k")
    with pytest.raises(ConfigError, match=r"pick one with --stage NAME"):
        load_config(staged)


def test_list_prints_the_papers_numbers(capsys):
    assert reproduce.main(["--list"]) == 0
    out = capsys.readouterr().out
    # Qu et al. Tab. 7, one shared LoRA + proj; Null-LoRA Tab. 2 test-dev (RECIPES.md)
    assert "routing_tab7_lora_proj" in out and "caption/test 117.43" in out
    assert "vqa/test-dev 77.48" in out and "resora_tab1_flickr30k (resora)" in out


def test_check_data_names_the_missing_files(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = reproduce.main(
        ["routing_tab7_lora_proj", f"data.root={tmp_path / 'empty'}", "--check-data"]
    )
    assert code == 1
    out = capsys.readouterr().out
    assert "vqa/train" in out and "missing" in out and "dataset_coco.json" in out
    # --root is data.root: the missing files are named under it
    (tmp_path / "other").mkdir()
    assert reproduce.main(["routing_tab7_lora_proj", "--root", str(tmp_path / "other"),
                           "--check-data"]) == 1  # fmt: skip
    out = capsys.readouterr().out
    assert str(tmp_path / "other") in out and str(tmp_path / "empty") not in out


def test_a_staged_recipe_reproduces_with_seeds(tmp_path, capsys):
    """Two stages × two seeds: stage 2 of each seed starts from stage 1 of that seed; the table
    holds mean ± std of the runs' own results and the difference to the paper's number."""
    generate(tmp_path / "data", images=24, seed=0, size=32)
    recipe = {
        "model": {"family": "clip-bart", "preset": "tiny", "overrides": {"image_size": 32}},
        "adapters": {"default": {"method": "lora", "r": 4}},
        "data": {"file": "tasks.yaml", "tasks": {"vqa": {"batch_size": 4}}},
        "train": {"steps": 2, "checkpoint_every": 0, "tensorboard": False},
        "eval": {"splits": ["test"], "max_records": 4, "max_new_tokens": 2},
        "paper": {"source": "A. Paper", "table": "Tab. 1", "results": {"vqa/test": 50.0}},
        "stages": {"first": {}, "second": {"train": {"init_from": "stage:first"},
                                           "paper": {"results": {"vqa/test": 60.0}}}},
    }  # fmt: skip
    path = tmp_path / "data" / "recipe.yaml"  # data.file relative to the recipe's folder
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "runs"
    assert reproduce.main([str(path), "--seeds", "2", "--out", str(out)]) == 0
    for seed in (0, 1):
        weights = json.loads((out / f"seed{seed}" / "second" / "weights.json").read_text())
        assert weights["init_from"] == str(out / f"seed{seed}" / "first")
        config = yaml.safe_load((out / f"seed{seed}" / "first" / "config.yaml").read_text())
        assert config["train"]["seed"] == seed and config["sampler"]["seed"] == seed
    table = json.loads((out / "reproduce.json").read_text())
    for stage, paper in (("first", 50.0), ("second", 60.0)):
        ours = [json.loads((out / f"seed{s}" / stage / "run.json").read_text())["results"]["vqa/test"]
                for s in (0, 1)]  # fmt: skip
        (row,) = table[stage]
        assert row["paper"] == paper and row["n"] == 2
        assert row["mean"] == pytest.approx(statistics.fmean(ours))
        assert row["std"] == pytest.approx(statistics.stdev(ours))
        assert row["diff"] == pytest.approx(statistics.fmean(ours) - paper)
    first = (out / "seed0" / "first" / "run.json").stat().st_mtime_ns
    assert reproduce.main([str(path), "--seeds", "2", "--out", str(out)]) == 0  # reused, not rerun
    assert (out / "seed0" / "first" / "run.json").stat().st_mtime_ns == first
    # a finished run of another config is not mixed into the table
    assert reproduce.main([str(path), "train.steps=3", "--out", str(out)]) == 1
    assert (
        "reusing a finished run with a changed config (train.steps: 2 → 3)"
        in capsys.readouterr().err
    )
    assert (
        reproduce.main([str(path), "eval.max_records=2", "--out", str(out)]) == 1
    )  # results differ
    assert "eval.max_records: 4 → 2" in capsys.readouterr().err


def test_a_run_without_overrides_is_reused_as_the_same_config(tmp_path):
    """roberta-vit fills model.overrides.answers when it starts: a config without overrides asks
    for the same run (its empty overrides section equals the absent one)."""
    from launch.resume import config_changes
    from launch.train import train

    generate(tmp_path / "data", images=24, seed=0, size=32)
    spec = {
        "model": {"family": "roberta-vit", "preset": "tiny"},
        "adapters": {"default": {"method": "lora", "r": 4}},
        "data": {"file": str(tmp_path / "data" / "tasks.yaml"), "tasks": {"vqa": {"batch_size": 4}}},
        "train": {"steps": 1, "checkpoint_every": 0, "tensorboard": False},
        "eval": {"splits": []},
    }  # fmt: skip
    train(load_config(None, data=spec), tmp_path / "run")
    assert config_changes(tmp_path / "run", load_config(None, data=spec)) == {}


def test_validate_checks_two_sets_that_need_the_weights():
    recipe = reproduce.find_recipe("nulllora_tab1_flickr30k")
    second = "adapters.second={method: null_lora, components: [text_encoder]}"
    with contextlib.redirect_stdout(io.StringIO()):
        (report,) = validate_config(recipe, [second]).values()
    assert all(info.get("checked") for info in report["sets"].values())
    assert set(report["sets"]) == {"default", "second"}
