"""``modify train`` with the causal rules: the predictor learns under --train routers and its loss is reported
apart; the threshold rule's running statistics reach the saved plan."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from modify.cli import main
from modify.train.report import read_metrics
from tests.train.conftest import train_args


def test_predictor_trains_with_the_routers_and_its_loss_is_reported(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    converted = tmp_path / "predictor"
    assert (
        main(["convert", str(tiny_run["src"]), str(converted), "--capacity", "0.5", "--causal", "predictor", "-q"]) == 0
    )
    out = tmp_path / "run"
    inputs = {**tiny_run, "predictor": converted}
    assert main(train_args(inputs, out, "--train", "routers", "--router-lr", "1e-2", model="predictor")) == 0
    before, after = load_file(converted / "model.safetensors"), load_file(out / "model.safetensors")
    assert not torch.equal(
        before["model.layers.1.mod_predictor.fc1.weight"], after["model.layers.1.mod_predictor.fc1.weight"]
    )
    assert torch.equal(before["model.layers.1.mlp.up_proj.weight"], after["model.layers.1.mlp.up_proj.weight"])
    rows = read_metrics(out / "metrics.csv")
    assert all(math.isfinite(r["aux_loss"]) and 0 < r["aux_loss"] < 5 for r in rows)
    # "loss" is the language model's alone (the aux loss is reported apart, not added to it)
    plain = tmp_path / "plain"
    assert main(train_args(tiny_run, plain, "--train", "routers", "--router-lr", "1e-2")) == 0
    assert read_metrics(plain / "metrics.csv")[0]["loss"] == rows[0]["loss"]
    assert json.loads((out / "config.json").read_text())["mixture_of_depths"]["causal"] == "predictor"


def test_threshold_running_statistics_reach_the_saved_plan(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(train_args(tiny_run, out, "--train", "routers", "--router-lr", "1e-2")) == 0
    plan = json.loads((out / "config.json").read_text())["mixture_of_depths"]
    assert plan["causal"] == "threshold"
    assert all(t != 0.0 for t in plan["thresholds"])  # moved from the fresh conversion's 0.0
