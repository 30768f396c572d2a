"""``modify inspect`` and ``modify verify``, the console script, help texts, and interrupts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import modify
from modify.cli import main
from modify.testing import tiny_model


def _json(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, dict]:
    code = main(list(argv))
    return code, json.loads(capsys.readouterr().out)


def test_inspect_source_and_converted(saved_models: dict, tmp_path: Path, capsys) -> None:
    code, source = _json(capsys, "inspect", str(saved_models["phi"]), "--seq-len", "64", "--json")
    assert code == 0 and not source["converted"]
    assert [b["form"] for b in source["blocks"]] == ["parallel"] * 4
    assert source["flops"]["dense"] == source["flops"]["routed"] == modify.flops(tiny_model("phi"), 64).dense
    assert all(b["flops_dense"] == b["flops_routed"] for b in source["blocks"])

    out = tmp_path / "out"
    assert main(["convert", str(saved_models["phi"]), str(out), "-q"]) == 0
    capsys.readouterr()
    code, converted = _json(capsys, "inspect", str(out), "--seq-len", "64", "--json")
    routed = [b for b in converted["blocks"] if b["routed"]]
    assert converted["converted"] and [b["index"] for b in routed] == [1, 3]
    assert all(b["capacity"] == 0.125 and b["flops_routed"] < b["flops_dense"] / 4 for b in routed)
    assert converted["flops"]["routed"] < converted["flops"]["dense"]

    assert main(["inspect", str(out), "--seq-len", "64"]) == 0
    table = capsys.readouterr().out
    assert "model.layers.1" in table and "0.125" in table and "total" in table


def test_inspect_reports_unroutable_blocks(tmp_path: Path, capsys) -> None:
    from torch import nn

    from modify.api import find_blocks
    from tests.helpers import ToyModel, toy_inputs

    model = ToyModel("pre-norm")
    model.layers[1] = type(model.layers[0])(8, "no-residual")
    infos = find_blocks(model, example_inputs=toy_inputs, strict=False)
    assert [b.form for b in infos] == ["pre-norm", "unroutable", "pre-norm"]
    assert "residual" in infos[1].reason
    assert isinstance(model.layers[1], nn.Module)


def test_verify_passes_and_fails_honestly(saved_models: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["convert", str(saved_models["llama"]), str(out), "-q"]) == 0
    capsys.readouterr()
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    code, report = _json(
        capsys, "verify", str(out), "--source", str(saved_models["llama"]), "--text", str(text), "--json"
    )
    assert code == 0 and report["ok"] and all(c["ok"] for c in report["checks"])
    assert report["ppl_source"] > 1 and report["ppl_converted"] > 1

    # Tamper with one non-router weight: the weights check must fail, and the exit code with it.
    weights = load_file(out / "model.safetensors")
    key = next(k for k in weights if "router" not in k and k.endswith("q_proj.weight"))
    weights[key] = weights[key] + 1
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    code, report = _json(capsys, "verify", str(out), "--source", str(saved_models["llama"]), "--json")
    failed = [c["name"] for c in report["checks"] if not c["ok"]]
    assert code == 1 and not report["ok"] and failed == ["weights"]


def test_verify_when_the_source_is_gone(tmp_path: Path, capsys) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("gpt2").save_pretrained(src)
    assert main(["convert", str(src), str(out), "-q"]) == 0
    for f in src.iterdir():
        f.unlink()
    src.rmdir()
    capsys.readouterr()
    assert main(["verify", str(out), "--json"]) == 1  # OUT records no path to look in: it says to pass --source
    assert "cannot find the source" in capsys.readouterr().err
    assert main(["verify", str(out), "--source", str(src)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_verify_refuses_an_unconverted_directory(saved_models: dict, capsys) -> None:
    assert main(["verify", str(saved_models["gpt2"])]) == 1
    assert "is not a converted checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["convert", "inspect", "verify", "calibrate", "train", "eval"])
def test_help_shows_examples(command: str) -> None:
    result = subprocess.run([sys.executable, "-m", "modify", command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "examples:" in result.stdout and f"modify {command} " in result.stdout.split("examples:")[1]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_mid_save_leaves_no_out(sig: int, tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    # Large enough (about 100 MB of float32) that saving takes a while.
    tiny_model("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=8, vocab_size=4096).save_pretrained(
        src
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "modify", "convert", str(src), str(out)], stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        partial = list(tmp_path.glob(".out.*.partial"))
        if partial and any(partial[0].iterdir()):
            break
        time.sleep(0.002)
    assert proc.poll() is None, "convert finished before it could be killed"
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    assert not out.exists()
    if sig == signal.SIGTERM:  # a catchable kill also cleans up its temporary directory and says so
        assert proc.returncode == 130
        assert not list(tmp_path.glob(".out.*"))
        assert "interrupted; nothing was written" in proc.stderr.read()
