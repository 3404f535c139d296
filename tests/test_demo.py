"""End-to-end smoke test of `make demo`'s entry point."""

from launch import demo


def test_demo_main_runs_every_method(capsys):
    rows = demo.main(["--steps", "3"])
    assert [r["method"] for r in rows] == [e[0] for e in demo.EXPERIMENTS]
    for row in rows:
        assert row["reload exact"] == "yes", row
        for key in ("merged-unmerged", "peft export diff"):
            if not row[key].startswith("n/a"):
                assert float(row[key]) < 1e-4, row
    assert "| method" in capsys.readouterr().out
