"""Calibration that measures ``kv="routed"`` and ``kv="all"`` for every block and chooses per block."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import modify
from modify.api import routed_blocks
from modify.calibrate.calibration import CalibrationSettings, apply_calibration, calibrate, option_costs, token_windows
from modify.calibrate.plan_file import load_plan, save_plan
from modify.testing import tiny_model, tiny_tokenizer

SETTINGS = CalibrationSettings(
    tokens=1024, seq_len=64, budget=0.6, sensitivity_tokens=128, batch_size=4, removal="never", kv=("routed", "all")
)


@pytest.fixture(scope="module")
def calibrated(text: Path):
    model = tiny_model("llama", num_hidden_layers=4)
    windows, data = token_windows(tiny_tokenizer(), [text], SETTINGS.seq_len, SETTINGS.tokens)
    return model, windows, data, calibrate(model, windows, data, SETTINGS)


def test_both_options_measured_and_priced(calibrated) -> None:
    model, _, _, cal = calibrated
    for row in cal.sensitivity.values():
        assert {"0.5", "0.5 kv-all", "0.125", "0.125 kv-all"} <= set(row)
        assert row["0.5"] != row["0.5 kv-all"]  # measured, not copied
    work = modify.convert(tiny_model("llama", num_hidden_layers=4), capacity=1.0, layers="all", kv="all")
    costs = option_costs(work, SETTINGS.grid, SETTINGS.seq_len, ("identity",), ("routed", "all"))
    for table in costs:
        # the skipped tokens' keys and values cost more than nothing, less than the whole block
        assert table[0.5, "identity"] < table[0.5, "identity", "all"] < table[1.0, "identity"]
    assert cal.cost_ratio <= SETTINGS.budget
    assert len(cal.kv) == 4 and set(cal.kv) <= {"routed", "all"}


def test_the_plan_carries_the_choice(calibrated, tmp_path: Path) -> None:
    model, windows, _, cal = calibrated
    path = save_plan(cal, tmp_path / "plan.json", {})
    loaded, _ = load_plan(path)
    assert loaded.kv == cal.kv
    converted = apply_calibration(tiny_model("llama", num_hidden_layers=4), loaded)
    chosen = {i: cal.kv[i] for i in cal.routed}
    assert {s.index: s.kv for _, s in routed_blocks(converted)} == chosen
    with torch.no_grad():
        assert torch.isfinite(converted(input_ids=windows[:4], labels=windows[:4]).loss)


def test_kv_only_all_never_chooses_routed(calibrated, text: Path) -> None:
    model, windows, data, _ = calibrated
    cal = calibrate(model, windows, data, dataclasses.replace(SETTINGS, kv=("all",), grid=(1.0, 0.5)))
    assert set(cal.kv) == {"all"} and all(" kv-all" in k or k in ("0", "1") for k in cal.sensitivity["1"])


def test_bad_kv_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="must be some of routed, all"):
        CalibrationSettings(kv=("some",))
