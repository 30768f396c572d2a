from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 30k tokens of three plays, for calibrating tiny models."""
    from modify.io.assets import shakespeare_split

    path = tmp_path_factory.mktemp("data") / "plays.txt"
    path.write_text("".join(p.read_text(errors="replace")[20000:60000] for p in shakespeare_split()[0][:3]))
    return path
