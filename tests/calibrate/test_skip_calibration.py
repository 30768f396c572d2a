"""Calibration with skip paths on a tiny Llama: fitted, chosen under the budget with their FLOPs, saved, applied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import modify
from modify.calibrate.calibration import (
    CalibrationSettings,
    apply_calibration,
    calibrate,
    option_costs,
    token_windows,
)
from modify.calibrate.plan_file import load_plan, save_plan
from modify.passes.find_block_stack import find_block_stack
from modify.testing import tiny_model, tiny_tokenizer

SETTINGS = CalibrationSettings(
    tokens=4096,
    seq_len=64,
    budget=0.6,
    sensitivity_tokens=512,
    batch_size=4,
    skip_paths=("linear-8", "mlp-8"),
    dtype="float32",
)


@pytest.fixture(scope="module")
def calibrated(text: Path):
    model = tiny_model("llama", num_hidden_layers=6)
    windows, data = token_windows(tiny_tokenizer(), [text], SETTINGS.seq_len, SETTINGS.tokens)
    return model, windows, calibrate(model, windows, data, SETTINGS)


def _block_flops(model: torch.nn.Module, seq_len: int) -> tuple[int, int]:
    count = modify.flops(model, seq_len)
    return sum(d for d, _ in count.blocks), sum(r for _, r in count.blocks)


def test_budget_met_with_the_skip_paths_flops(calibrated) -> None:
    model, windows, cal = calibrated
    assert SETTINGS.skip_paths == ("identity", "linear-8", "mlp-8")  # identity is always a candidate
    assert any(p != "identity" for p in cal.skip_paths), "the planner found no use for a fitted path here"
    assert all(p == "identity" for c, p in zip(cal.capacities, cal.skip_paths) if c == 1.0)
    apply_calibration(model, cal)
    dense, routed = _block_flops(model, SETTINGS.seq_len)
    # modify.flops counts each path on the skipped tokens (tests/test_flops.py checks it against FlopCounterMode).
    assert routed / dense == pytest.approx(cal.cost_ratio) and cal.cost_ratio <= SETTINGS.budget
    costs = option_costs(model, [1.0, 0.5], SETTINGS.seq_len, SETTINGS.skip_paths)
    assert costs[0][0.5, "linear-8"] > costs[0][0.5, "identity"]
    modify.revert(model)


def test_every_option_was_measured_and_the_fits_recorded(calibrated) -> None:
    _, _, cal = calibrated
    # Removal is an option with each path too: "0 linear-8" is the path alone, on every token.
    assert set(cal.sensitivity["2"]) == {"0", "1", "0 linear-8", "0 mlp-8"} | {
        f"{c:g}{s}" for c in (0.75, 0.5, 0.25, 0.125) for s in ("", " linear-8", " mlp-8")
    }
    with_path = [str(i) for i, p in enumerate(cal.skip_paths) if p != "identity"]
    assert sorted(cal.skip_fit) == sorted(with_path) and all(-1 < r2 <= 1 for r2 in cal.skip_fit.values())
    assert sorted(cal.skips) == sorted(int(i) for i in with_path)
    assert cal.plan().skip_paths == [cal.skip_paths[i] for i in cal.routed]


def test_skip_paths_survive_the_plan_file_and_keep_capacity_one_exact(calibrated, tmp_path: Path) -> None:
    model, windows, cal = calibrated
    ids = windows[:2]
    path = save_plan(cal, tmp_path / "plan.json", {"kind": "test"})
    loaded, _ = load_plan(path)
    assert loaded.skip_paths == cal.skip_paths and loaded.to_dict() == json.loads(json.dumps(cal.to_dict()))
    with torch.no_grad():
        dense = model(ids).logits
        apply_calibration(model, cal)
        expected = model(ids).logits
        modify.revert(model)
        apply_calibration(model, loaded)
        assert torch.equal(model(ids).logits, expected)
        assert not torch.equal(expected, dense)
        for _, state in modify.api.routed_blocks(model):  # fitted routers and paths, nothing skipped
            state.capacity = 1.0
        assert torch.equal(model(ids).logits, dense)
    modify.revert(model)


def test_fitted_paths_lower_the_loss_against_pure_routing(calibrated) -> None:
    """The planned model with its fitted paths against the same plan with the paths removed."""
    model, windows, cal = calibrated
    ids = windows[:8]
    apply_calibration(model, cal)
    with torch.no_grad():
        with_paths = float(model(input_ids=ids, labels=ids).loss)
        _, stack = find_block_stack(model)
        for block in stack:
            if hasattr(block, "mod_skip_path"):
                del block.mod_skip_path
        without = float(model(input_ids=ids, labels=ids).loss)
    modify.revert(model)
    assert with_paths < without


def test_cli_calibrate_with_a_skip_path_then_inspect(text: Path, tmp_path: Path, capsys) -> None:
    from modify.cli import main

    src = tmp_path / "src"
    tiny_model("llama", num_hidden_layers=6).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    flags = ["--tokens", "2048", "--seq-len", "64", "--sensitivity-tokens", "256", "--flops-budget", "0.6"]
    plan = tmp_path / "plan.json"
    argv = ["calibrate", str(src), "--data", str(text), "--out", str(plan), *flags, "--skip-path", "linear"]
    assert main([*argv, "--skip-rank", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["skip_paths"]) <= {"identity", "linear-4"}
    assert json.loads(plan.read_text())["settings"]["skip_paths"] == ["identity", "linear-4"]
    assert main(["convert", str(src), str(tmp_path / "out"), "--plan", str(plan), "-q"]) == 0
    assert main(["inspect", str(tmp_path / "out"), "--seq-len", "64", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["blocks"]
    assert [r["skip_path"] for r in rows if r["routed"]] == summary["skip_paths"]
    assert main(["inspect", str(tmp_path / "out"), "--seq-len", "64"]) == 0
    assert "skip path" in capsys.readouterr().out
    assert main([*argv, "--skip-rank", "-1"]) == 2
    assert "skip rank -1 must be a positive integer" in capsys.readouterr().err
