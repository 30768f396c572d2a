"""Removal (capacity 0) among the planner's options: chosen where it is the cheapest loss, never beaten by a
removal-only plan, and a removal-only calibration that exports as a plain model."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

import modify
from modify.calibrate.calibration import CalibrationSettings, apply_calibration, calibrate, replan, token_windows
from modify.calibrate.plan_file import load_plan, save_plan
from modify.calibrate.planning import (
    DEFAULT_GRID,
    brute_force_plan,
    option_capacity,
    plan_under_budget,
    restrict_removal,
)
from modify.testing import tiny_model, tiny_tokenizer

SETTINGS = CalibrationSettings(tokens=2048, seq_len=64, budget=0.6, sensitivity_tokens=256, batch_size=4)


def _tables(n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(capacity, skip path) options with removal: free, its loss anywhere from negligible to ruinous."""
    rng = random.Random(seed)
    loss, cost = [], []
    for _ in range(n):
        scale, removal, helps = rng.uniform(0.01, 3.0), rng.uniform(0.0, 5.0), rng.uniform(0.0, 1.0)
        lose, pay = {(1.0, "identity"): 0.0}, {(1.0, "identity"): 1.0}
        for c in DEFAULT_GRID[1:]:
            lose[c, "identity"] = removal if c == 0 else scale * (1 - c)
            pay[c, "identity"] = 0.0 if c == 0 else c + 0.01
            lose[c, "linear-8"] = lose[c, "identity"] * helps
            pay[c, "linear-8"] = pay[c, "identity"] + 0.05 * (1 - c)
        loss.append(lose)
        cost.append(pay)
    return loss, cost


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("budget", [0.3, 0.6, 0.9])
def test_calibrated_plan_never_worse_than_removal_only(seed: int, budget: float) -> None:
    loss, cost = _tables(6, seed)
    full = plan_under_budget(loss, cost, budget)
    only_loss, only_cost = restrict_removal(loss, "only"), restrict_removal(cost, "only")
    removal = plan_under_budget(only_loss, only_cost, budget)
    assert all(o in ((1.0, "identity"), (0.0, "identity")) for o in removal.capacities)
    assert removal.predicted_loss_increase == pytest.approx(
        brute_force_plan(only_loss, only_cost, budget).predicted_loss_increase, abs=1e-12
    )
    assert full.predicted_loss_increase <= removal.predicted_loss_increase + 1e-12
    never = plan_under_budget(restrict_removal(loss, "never"), restrict_removal(cost, "never"), budget)
    assert all(option_capacity(o) > 0 for o in never.capacities)
    assert full.predicted_loss_increase <= never.predicted_loss_increase + 1e-12


def test_removal_is_chosen_where_it_loses_least_per_flop() -> None:
    """Block 1 loses as much removed as routed at 0.5, for none of the FLOPs: removed. Block 2 loses a lot
    removed and little routed: routed, not removed."""
    loss, cost = [], []
    for removal, routed in ((9.0, 9.0), (0.2, 0.2), (9.0, 0.05), (9.0, 9.0)):
        loss.append({1.0: 0.0, 0.5: routed, 0.0: removal})
        cost.append({1.0: 1.0, 0.5: 0.5, 0.0: 0.0})
    plan = plan_under_budget(loss, cost, 0.65)
    assert plan.capacities == (1.0, 0.0, 0.5, 1.0)


def test_restrict_removal_refuses_bad_modes() -> None:
    with pytest.raises(ValueError, match="unknown removal mode 'sometimes'"):
        restrict_removal([{1.0: 0.0}], "sometimes")
    with pytest.raises(ValueError, match="add 0 to the grid"):
        restrict_removal([{1.0: 0.0, 0.5: 1.0}], "only")


def test_settings_put_removal_on_the_grid_as_asked() -> None:
    assert 0.0 in DEFAULT_GRID and CalibrationSettings().grid == DEFAULT_GRID
    assert CalibrationSettings(grid=(1.0, 0.5), removal="allow").grid == (1.0, 0.5, 0.0)
    assert CalibrationSettings(removal="never").grid == DEFAULT_GRID[:-1]
    assert CalibrationSettings(removal="only").grid == (1.0, 0.0)
    with pytest.raises(ValueError, match="no skip path"):
        CalibrationSettings(removal="only", skip_paths=("linear-8",))
    with pytest.raises(ValueError, match="unknown removal mode"):
        CalibrationSettings(removal="maybe")


@pytest.fixture(scope="module")
def calibrations(text: Path):
    model = tiny_model("llama", num_hidden_layers=6)
    windows, data = token_windows(tiny_tokenizer(), [text], SETTINGS.seq_len, SETTINGS.tokens)
    # A budget where routing alone (grid floor 0.125 plus routers) can't reach far: removal must compete.
    settings = CalibrationSettings(**{**SETTINGS.__dict__, "budget": 0.3})
    only = CalibrationSettings(**{**settings.__dict__, "removal": "only"})
    return model, windows, calibrate(model, windows, data, settings), calibrate(model, windows, data, only)


def test_calibration_measures_removal_and_beats_removal_only(calibrations) -> None:
    model, _, allowed, only = calibrations
    assert set(only.capacities) <= {0.0, 1.0} and 0.0 in only.capacities
    assert only.cost_ratio <= 0.3 and allowed.cost_ratio <= 0.3
    # The same measurement of removal in both runs (the same dense pass and windows).
    assert all(allowed.sensitivity[str(i)]["0"] == only.sensitivity[str(i)]["0"] for i in range(6))
    removal_only = replan(allowed, model, 0.3, SETTINGS.seq_len, removal="only")
    assert removal_only.capacities == tuple((c, "identity") for c in only.capacities)
    assert allowed.predicted_loss_increase <= removal_only.predicted_loss_increase + 1e-12
    never = replan(allowed, model, 0.6, SETTINGS.seq_len, removal="never")
    assert all(c > 0 for c, _ in never.capacities)


def test_removed_blocks_have_no_threshold_or_overlap(calibrations, tmp_path: Path) -> None:
    model, windows, _, only = calibrations
    removed = [str(i) for i, c in enumerate(only.capacities) if c == 0.0]
    assert removed and not set(removed) & (set(only.thresholds) | set(only.router_overlap))
    loaded, _ = load_plan(save_plan(only, tmp_path / "plan.json", {"kind": "test"}))
    assert json.loads((tmp_path / "plan.json").read_text())["capacities"] == only.capacities
    ids = windows[:2]
    model = apply_calibration(copy.deepcopy(model), loaded)
    assert model.config.mixture_of_depths["thresholds"] == [None] * len(removed)
    with torch.no_grad():
        expected = model(ids).logits
        generated = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    modify.export_pruned(model)
    assert model.config.num_hidden_layers == 6 - len(removed)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
        assert torch.equal(model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False), generated)
