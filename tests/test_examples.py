from __future__ import annotations

import runpy
from pathlib import Path


def test_quickstart_runs(capsys) -> None:
    runpy.run_path(str(Path(__file__).parents[1] / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "router grad norm" in out and "generated" in out


def test_mode_comparison_runs_at_equal_flops(tmp_path, monkeypatch) -> None:
    """examples/mode_tiny_moe.py in miniature: both variants converted within one capacity step of the budget."""
    import json
    import sys

    out = tmp_path / "mode.json"
    argv = ["mode_tiny_moe.py", "--pretrain-steps", "2", "--steps", "2", "--seq-len", "32", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(Path(__file__).parents[1] / "examples" / "mode_tiny_moe.py"), run_name="__main__")
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"dense", "staged", "integrated"}
    for name in ("staged", "integrated"):
        assert abs(rows[name]["flop_ratio"] - 0.8) < 0.03 and rows[name]["capacity"] < 1
