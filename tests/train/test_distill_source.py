"""``modify train --distill`` distils from the conversion's source (issue 30, "also check"): the teacher is
MODEL with routing off, or a frozen copy of MODEL. After a run whose ``--train`` moved base weights, the
trained checkpoint is neither, so a second run on it without ``--teacher`` would distil from the first run's
weights. It is refused in one line naming the fix; with ``--teacher SRC`` it runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from modify.cli import main
from tests.train.conftest import train_args


@pytest.mark.parametrize("first", ["full", "routers+norms"])
def test_a_second_run_on_trained_base_weights_needs_the_source_as_teacher(
    first: str, tiny_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trained = tmp_path / "first"
    assert main(train_args(tiny_run, trained, "--train", first, "--lr", "1e-2")) == 0
    second = {**tiny_run, "trained": trained}
    out = tmp_path / "second"
    capsys.readouterr()
    assert main(train_args(second, out, "--distill", model="trained")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error" not in err[0], err
    assert not out.exists()
    assert main(train_args(second, out, "--distill", "--teacher", str(tiny_run["src"]), model="trained")) == 0


def test_a_second_run_after_routers_alone_keeps_the_self_teacher(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    """Routers alone leave the base weights as converted: the trained model with routing off is the source."""
    trained = tmp_path / "first"
    assert main(train_args(tiny_run, trained, "--train", "routers", "--lr", "1e-2")) == 0
    assert main(train_args({**tiny_run, "trained": trained}, tmp_path / "second", "--distill", model="trained")) == 0
