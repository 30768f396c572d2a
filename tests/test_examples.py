from __future__ import annotations

import runpy
from pathlib import Path


def test_quickstart_runs(capsys) -> None:
    runpy.run_path(str(Path(__file__).parents[1] / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "router grad norm" in out and "generated" in out
