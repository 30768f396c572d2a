"""A flag means one thing in every subcommand: ``--dtype`` the weights' dtype (train's compute dtype is
``--autocast``), ``--mode`` convert's Mixture-of-Depths mode (bench's choice of what to time is ``--measure``),
``--seq-len`` one default or a reason in its help, and convert's calibration settings refused without
``--calibrate`` instead of ignored."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from modify.cli import _parser, main
from modify.config import MODES
from modify.testing import tiny_model, tiny_tokenizer
from modify.train.config import TrainConfig, load_config_file

#: convert's flags that only calibration reads, each with a valid value.
CALIBRATION_FLAGS = {
    "--flops-budget": "0.7",
    "--tokens": "4096",
    "--seq-len": "64",
    "--grid": "0.5,0.25",
    "--sensitivity-tokens": "256",
    "--seed": "3",
    "--keep-first": "2",
    "--refine-rounds": "1",
    "--calibration-dtype": "float32",
    "--removal": "only",
}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """stderr of an argv that argparse refuses, after checking it exits 2 with one line."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("flag", list(CALIBRATION_FLAGS))
def test_calibration_flags_without_calibrate_are_refused(flag: str, tmp_path: Path, capsys) -> None:
    for source in ([], ["--plan", str(tmp_path / "plan.json")]):
        err = _usage_error(["convert", "src", str(tmp_path / "out"), *source, flag, CALIBRATION_FLAGS[flag]], capsys)
        assert err.startswith(f"modify convert: error: {flag}: calibration setting") and "--calibrate" in err
    assert not (tmp_path / "out").exists()


def test_several_calibration_flags_are_named_in_one_line(capsys) -> None:
    err = _usage_error(["convert", "src", "out", "--tokens", "4096", "--keep-first", "2"], capsys)
    assert "--tokens, --keep-first: calibration settings" in err and "drop them" in err


def test_calibration_flag_without_calibrate_exits_2_from_the_shell(saved_models: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "modify", "convert", str(saved_models["llama"]), str(out), "--flops-budget", "0.7"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "modify convert: error: --flops-budget: calibration setting, used only with --calibrate FILE...; "
        "add --calibrate or drop it; see 'modify convert --help'"
    ]
    assert not out.exists()


def test_convert_calibrate_parses_the_same_defaults_as_calibrate() -> None:
    parser = _parser()
    converting = parser.parse_args(["convert", "src", "out", "--calibrate", "a.txt", "--flops-budget", "0.7"])
    calibrating = parser.parse_args(["calibrate", "src", "--data", "a.txt", "--flops-budget", "0.7", "--out", "p.json"])
    assert converting.keep_first == calibrating.keep_first == 1  # the attention sink
    dests = [_option(_subparsers()["calibrate"], flag).dest for flag in CALIBRATION_FLAGS]
    assert {d: getattr(converting, d) for d in dests} == {d: getattr(calibrating, d) for d in dests}
    # a plain conversion (no calibration) still parses
    assert parser.parse_args(["convert", "src", "out"]).data is None


def test_every_dtype_flag_is_the_weights_dtype() -> None:
    seen = []
    for name, sub in _subparsers().items():
        action = _option(sub, "--dtype")
        if action is None:
            continue
        seen.append(name)
        assert action.help.startswith("weights dtype"), (name, action.help)
        assert "autocast" not in action.help and "compute" not in action.help, (name, action.help)
        assert set(action.choices) <= {"float32", "bfloat16", "float16"}, (name, action.choices)  # no "auto"
    assert {"convert", "train", "eval", "generate", "bench"} <= set(seen)


def test_mode_is_the_mixture_of_depths_mode_wherever_it_is() -> None:
    for name, sub in _subparsers().items():
        action = _option(sub, "--mode")
        assert action is None or tuple(action.choices) == tuple(MODES), name
    assert _option(_subparsers()["convert"], "--mode") is not None


def test_bench_measure_replaces_mode(capsys) -> None:
    args = _parser().parse_args(["bench", "smollm2-135m", "--measure", "forward"])
    assert args.measure == "forward" and not hasattr(args, "mode")
    assert _parser().parse_args(["bench", "smollm2-135m"]).measure == "both"
    _usage_error(["bench", "smollm2-135m", "--mode", "forward"], capsys)


def test_seq_len_defaults_agree_or_say_why() -> None:
    """512 where the length is the text's (eval, train, calibrate and convert --calibrate); elsewhere the help
    says why it differs and what the others use."""
    from modify.io.checkpoint import CARD_SEQ_LEN

    subs = _subparsers()
    assert TrainConfig.__dataclass_fields__["seq_len"].default == 512
    for name in ("eval", "calibrate"):
        assert _option(subs[name], "--seq-len").default == 512, name
    assert _parser().parse_args(["convert", "s", "o", "--calibrate", "a.txt"]).seq_len == 512
    inspect, bench = _option(subs["inspect"], "--seq-len"), _option(subs["bench"], "--seq-len")
    assert inspect.default == CARD_SEQ_LEN and "model card" in inspect.help and "512" in inspect.help
    assert bench.default == [1024] and "timing" in bench.help and "512" in bench.help
    for name in ("eval", "calibrate", "train"):  # each names the others that share its default
        others = {"eval", "calibrate", "train"} - {name}
        assert all(re.search(rf"\b{o}'s", _option(subs[name], "--seq-len").help) for o in others), name


def test_train_dtype_is_the_weights_and_autocast_the_compute() -> None:
    from modify.cli.train import resolve_config

    def config(*flags: str) -> TrainConfig:
        args = _parser().parse_args(["train", "m", "--data", "d", "--out", "o", "--steps", "1", *flags])
        return resolve_config(args)

    default = config()
    assert (default.dtype, default.autocast) == ("float32", "auto")
    chosen = config("--dtype", "bfloat16", "--autocast", "none")
    assert (chosen.dtype, chosen.autocast) == ("bfloat16", "none")
    assert config("--autocast", "bfloat16").dtype == "float32"
    with pytest.raises(SystemExit):
        config("--dtype", "auto")  # the compute dtype's choice, not the weights'


@pytest.fixture(scope="module")
def tiny_converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny converted llama with a tokenizer, and a text file to train on."""
    root = tmp_path_factory.mktemp("flags")
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "<eos>"})
    tiny_model("llama", vocab_size=98).save_pretrained(root / "src")
    tokenizer.save_pretrained(root / "src")
    assert main(["convert", str(root / "src"), str(root / "mod"), "--capacity", "0.5", "-q"]) == 0
    (root / "data.txt").write_text("the cat sat on a mat and the dog ran to it. " * 40)
    return root / "mod", root / "data.txt"


def _train(tiny_converted: tuple[Path, Path], out: Path, *flags: str) -> list[str]:
    model, data = tiny_converted
    return ["train", str(model), "--data", str(data), "--out", str(out), "--steps", "2", "--seq-len", "16",
            "--batch-size", "2", "--eval-fraction", "0", "-q", *flags]  # fmt: skip


def test_train_dtype_loads_the_weights_in_it(tiny_converted: tuple[Path, Path], tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert main(_train(tiny_converted, out, "--dtype", "bfloat16", "--autocast", "none")) == 0
    weights = load_file(out / "model.safetensors")
    assert {w.dtype for k, w in weights.items() if "router" not in k} == {torch.bfloat16}
    assert {w.dtype for k, w in weights.items() if "router" in k} == {torch.float32}  # routers stay float32
    saved = load_config_file(out / "train_config.yaml")
    assert (saved["dtype"], saved["autocast"]) == ("bfloat16", "none")


def test_a_run_saved_by_version_1_resumes(
    tiny_converted: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A train_config.yaml written before --autocast (its dtype: float32 meant no autocast) resumes its run."""
    out = tmp_path / "run"
    assert main(_train(tiny_converted, out, "--autocast", "none", "--save-every", "1")) == 0
    saved = out / "train_config.yaml"
    monkeypatch.chdir(out)  # version 1 reads its paths from the cwd; version 3 wrote them relative to the file
    text = saved.read_text().replace("autocast: none\n", "").replace("version: 3", "version: 1")
    assert "dtype: float32" in text and "autocast" not in text
    saved.write_text(text)
    assert main(["train", "--config", str(saved), "--steps", "3", "--resume", "-q"]) == 0
    resumed = load_config_file(saved)
    assert (resumed["dtype"], resumed["autocast"], resumed["version"], resumed["steps"]) == ("float32", "none", 3, 3)


@pytest.mark.parametrize(("old", "autocast"), [("float32", "none"), ("bfloat16", "bfloat16"), ("auto", "auto")])
def test_a_version_1_train_config_still_loads(old: str, autocast: str, tmp_path: Path) -> None:
    """Version 1 called the autocast dtype ``dtype`` (float32: none); a run saved then resumes from its file."""
    path = tmp_path / "train_config.yaml"
    path.write_text(f"model: m\ndata: [d]\nout: o\nsteps: 4\ndtype: {old}\nversion: 1\n")
    settings = load_config_file(path)
    assert settings["autocast"] == autocast and "dtype" not in settings and settings["version"] == 3
    config = TrainConfig(**settings)
    assert (config.dtype, config.autocast) == ("float32", autocast)  # version 1 trained float32 weights
    config.save(tmp_path / "again.yaml")
    assert TrainConfig(**load_config_file(tmp_path / "again.yaml")) == config


def test_an_unversioned_config_with_an_autocast_dtype_says_so(tmp_path: Path) -> None:
    from modify.errors import UsageError

    path = tmp_path / "train.yaml"
    path.write_text("model: m\ndata: [d]\nout: o\nsteps: 4\ndtype: auto\n")
    with pytest.raises(
        UsageError, match="--dtype 'auto' is not one of float32, bfloat16; the compute dtype is --autocast"
    ):
        TrainConfig(**load_config_file(path))
