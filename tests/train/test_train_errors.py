"""Every bad input of ``modify train``: one line on stderr, a non-zero exit, no traceback, nothing written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from modify.cli import main
from modify.train.config import TrainConfig, load_config_file
from tests.cli.conftest import tree_digest
from tests.train.conftest import train_args


def _empty_dir(root: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def _empty_files(root: Path) -> Path:
    (root / "blank").mkdir()
    (root / "blank" / "a.txt").write_text("")
    return root / "blank"


def _config(root: Path, text: str, suffix: str = ".yaml") -> Path:
    path = root / f"settings{suffix}"
    path.write_text(text)
    return path


# (id, argv builder, what the one-line error must say)
CASES: list[tuple[str, Callable[[dict[str, Path], Path], list[str]], str]] = [
    ("missing data", lambda i, t: train_args({**i, "data": t / "nowhere"}, t / "out"), "does not exist"),
    ("empty data dir", lambda i, t: train_args({**i, "data": _empty_dir(t)}, t / "out"), "no text files"),
    ("empty data files", lambda i, t: train_args({**i, "data": _empty_files(t)}, t / "out"), "empty"),
    ("no data flag", lambda i, t: ["train", str(i["converted"]), "--out", str(t / "out"), "--steps", "2"], "--data"),
    ("unconverted without --dense", lambda i, t: train_args(i, t / "out", model="src"), "--dense"),
    ("converted with --dense", lambda i, t: train_args(i, t / "out", "--dense"), "converted"),
    ("missing model", lambda i, t: train_args({**i, "converted": t / "no-model"}, t / "out"), "does not exist"),
    ("negative lr", lambda i, t: train_args(i, t / "out", "--lr", "-1"), "--lr must be a non-negative"),
    ("steps and tokens", lambda i, t: train_args(i, t / "out", "--tokens", "100"), "not both"),
    ("zero batch", lambda i, t: train_args(i, t / "out", "--batch-size", "0"), "--batch-size must be a positive"),
    (
        "routers on dense",
        lambda i, t: train_args(i, t / "out", "--dense", "--train", "routers", model="src"),
        "routers",
    ),
    ("bad config value", lambda i, t: train_args(i, t / "out", "--config", str(_config(t, "lr: fast\n"))), "--lr"),
    ("unknown config key", lambda i, t: train_args(i, t / "out", "--config", str(_config(t, "lr_max: 1\n"))), "lr_max"),
    (
        "config not parsing",
        lambda i, t: train_args(i, t / "out", "--config", str(_config(t, "a = [", ".toml"))),
        "parse",
    ),
    ("config kind", lambda i, t: train_args(i, t / "out", "--config", str(_config(t, "x", ".ini"))), "YAML"),
    ("missing config", lambda i, t: train_args(i, t / "out", "--config", str(t / "none.yaml")), "does not exist"),
    ("out under a file", lambda i, t: train_args(i, _file(t) / "out"), "not a directory"),
    ("out is a file", lambda i, t: train_args(i, _file(t)), "is a file"),
    ("resume without checkpoint", lambda i, t: train_args(i, t / "out", "--resume"), "no complete checkpoint"),
    ("resume missing dir", lambda i, t: train_args(i, t / "out", "--resume", str(t / "nope")), "does not exist"),
    ("seq-len too long for data", lambda i, t: train_args(i, t / "out", "--seq-len", "100000"), "seq-len"),
]


def _file(root: Path) -> Path:
    path = root / "a-file"
    path.write_text("not a directory")
    return path


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_run: dict[str, Path], tmp_path: Path, capsys) -> None:
    _, build, expected = case
    argv = build(tiny_run, tmp_path)
    before = tree_digest(tmp_path)
    sources = tree_digest(tiny_run["converted"])
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and expected in err[0], err
    assert err[0].startswith("modify train: ") and "Traceback" not in err[0]
    assert tree_digest(tmp_path) == before  # nothing written, nothing left half-made
    assert tree_digest(tiny_run["converted"]) == sources


def test_resume_from_another_run_is_refused(tiny_run: dict[str, Path], tmp_path: Path, capsys) -> None:
    assert main(train_args(tiny_run, tmp_path / "a", "--save-every", "2", "--seed", "1")) == 0
    checkpoint = tmp_path / "a" / "checkpoints" / "step-000002"
    (tmp_path / "b").mkdir()
    for extra, what in ((["--seed", "2"], "seed"), (["--seed", "1", "--seq-len", "8"], "seq_len")):
        before = tree_digest(tmp_path)
        code = main(train_args(tiny_run, tmp_path / "b", *extra, "--resume", str(checkpoint)))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and "from another run" in err[0] and what in err[0], err
        assert tree_digest(tmp_path) == before
    code = main(train_args(tiny_run, tmp_path / "b", "--seed", "1", "--resume", str(tmp_path / "a")))
    assert code == 1 and "not a checkpoint" in capsys.readouterr().err


def test_an_existing_run_directory_is_not_overwritten(tiny_run: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(train_args(tiny_run, out)) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_config_file_precedence_and_formats(tmp_path: Path) -> None:
    yaml_file = _config(tmp_path, "lr: 3.0e-4\nseq-len: 64\ndata: corpus.txt\nsteps: 10\n")
    toml_file = _config(tmp_path, 'lr = 3e-4\nseq_len = 64\ndata = ["corpus.txt"]\nsteps = 10\n', ".toml")
    for path in (yaml_file, toml_file):
        settings = load_config_file(path)
        assert settings == {"lr": 3e-4, "seq_len": 64, "data": ["corpus.txt"], "steps": 10}
        config = TrainConfig(**{**settings, "seq_len": 128})  # a flag overrides the file
        assert config.seq_len == 128 and config.lr == 3e-4 and config.batch_size == 8
    saved = tmp_path / "saved.yaml"
    config.save(saved)
    assert TrainConfig(**load_config_file(saved)) == config
