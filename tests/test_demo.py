"""The demos: the adapter-core tour, and `make demo` at its quick settings."""

import json

from launch import demo, demo_methods


def test_demo_methods_runs_every_method(capsys):
    rows = demo_methods.main(["--steps", "3"])
    assert [r["method"] for r in rows] == [e[0] for e in demo_methods.EXPERIMENTS]
    for row in rows:
        assert row["reload exact"] == "yes", row
        for key in ("merged-unmerged", "peft export diff"):
            if not row[key].startswith("n/a"):
                assert float(row[key]) < 1e-4, row
    assert "| method" in capsys.readouterr().out
    dora = next(r for r in rows if r["method"].startswith("DoRA"))  # merges and exports to peft
    assert not dora["merged-unmerged"].startswith("n/a") and dora["peft export diff"] != "n/a"


def test_make_demo_quick_prints_the_leaderboard_with_baselines(tmp_path, capsys):
    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--quick"])
    printed = capsys.readouterr().out
    table = json.loads((out / "leaderboard.json").read_text())
    assert table["tasks"] == ["caption", "gqa", "nlvr2", "retrieval", "vqa"]
    rows = {r["run"]: r for r in table["rows"]}
    assert set(rows) == {"baseline", "clip_bart", "blip"}
    assert rows["baseline"]["nlvr2"] is not None and rows["baseline"]["retrieval"] is not None
    assert rows["blip"]["vqa"] is None and rows["clip_bart"]["retrieval"] is None
    assert "| baseline |" in printed and "| clip_bart |" in printed
    for name in ("clip_bart", "blip"):
        assert (out / "runs" / name / "adapters").is_dir()
    # the warm-started BART is a transformers directory the run loaded
    assert (out / "backbones" / "clip-bart-text" / "model.safetensors").is_file()
    # a second run reuses the data and the warm start, and retrains the runs
    demo.main(["--out", str(out), "--quick"])
    assert printed.count("wrote") >= 2
    again = capsys.readouterr().out
    assert "reusing" in again and again.count("reusing") == 2
