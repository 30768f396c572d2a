"""Routing statistics, the collapse alarm, and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

import modify
from modify.testing import tiny_model
from modify.train.loop import lr_factor
from modify.train.stats import RoutingMonitor
from tests.helpers import set_router_weights


def _monitored(patience: int = 3) -> tuple[torch.nn.Module, RoutingMonitor, list[str]]:
    model = modify.convert(tiny_model("llama"), capacity=0.25, layers=[1, 2])
    warnings: list[str] = []
    return model, RoutingMonitor(model, patience=patience, warn=warnings.append), warnings


def test_statistics_of_a_content_router() -> None:
    model, monitor, warnings = _monitored()
    set_router_weights(model, std=4.0)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        with torch.no_grad():
            model(torch.randint(0, 97, (4, 32), generator=gen))
        row = monitor.end_step(step)
    assert set(row) == {f"{k}_{b}" for b in (1, 2) for k in ("gate", "entropy", "overlap")}
    assert all(0 < row[f"gate_{b}"] < 2 for b in (1, 2))
    assert all(0 < row[f"entropy_{b}"] < 0.999 for b in (1, 2))  # scores differ: below uniform
    assert all(row[f"overlap_{b}"] < 0.9 for b in (1, 2))  # other text, other tokens kept
    assert warnings == []
    monitor.close()
    assert all(state.observer is None for _, state in modify.api.routed_blocks(model))


def test_a_router_that_scores_every_token_alike_raises_the_alarm_once() -> None:
    model, monitor, warnings = _monitored(patience=3)
    with torch.no_grad():  # zero routers (a fresh one starts random): every score 0
        for block, _ in modify.api.routed_blocks(model):
            block.mod_router.weight.zero_()
    for step in range(1, 8):
        with torch.no_grad():
            model(torch.randint(0, 97, (2, 16)))
        row = monitor.end_step(step)
    assert row["entropy_1"] == pytest.approx(1.0)
    assert row["overlap_1"] == 1.0  # the first k tokens, every time
    assert len(warnings) == 2  # blocks 1 and 2, once each
    assert "step 3: routing collapse in block 1" in warnings[0] and "alike" in warnings[0]


def test_a_kept_set_frozen_whatever_the_text_raises_the_alarm() -> None:
    model, monitor, warnings = _monitored(patience=3)

    def positional(x: torch.Tensor) -> torch.Tensor:  # later positions score higher, whatever the text
        return torch.arange(x.shape[1], dtype=torch.float32).expand(x.shape[0], -1)

    for block, _ in modify.api.routed_blocks(model):
        block.mod_router.forward = positional  # type: ignore[method-assign]
    for step in range(1, 6):
        with torch.no_grad():
            model(torch.randint(0, 97, (2, 16)))
        monitor.end_step(step)
    assert len(warnings) == 2 and "kept the same positions" in warnings[0]


def test_no_alarm_while_capacity_is_still_one() -> None:
    model, monitor, warnings = _monitored(patience=2)
    for _, state in modify.api.routed_blocks(model):
        state.capacity = 1.0
    for step in range(1, 6):
        with torch.no_grad():
            model(torch.randint(0, 97, (2, 16)))
        monitor.end_step(step)
    assert warnings == []


def test_learning_rate_schedule() -> None:
    assert [lr_factor(s, 10, 2, "cosine") for s in (1, 2)] == [0.5, 1.0]
    assert lr_factor(10, 10, 2, "cosine") == pytest.approx(0.1)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(1 - 0.9 * 0.5)
    assert lr_factor(9, 10, 2, "constant") == 1.0
    assert lr_factor(3, 10, 0, "constant") == 1.0
