"""Gradient checkpointing and the running threshold (issue 30, "also check"): a recompute in backward must not
run the routed forward's learning a second time, or the threshold's average would move twice per step.

With transformers 5.25 it doesn't: the checkpointing wraps each layer class's ``forward``, and a routed block's
forward is its instance's own, so the routed blocks are not recomputed at all (measured: the block's MLP runs
6 times in a step of the paper's plan on 4 blocks with checkpointing, 8 for the plain model). This pins the
threshold's single move whichever way that goes."""

from __future__ import annotations

import pytest
import torch

import modify
from modify.api import routed_blocks
from modify.testing import tiny_model

IDS = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(0))


def _thresholds_after_a_step(checkpointing: str) -> list[float]:
    model = modify.convert(tiny_model("llama"), capacity=0.5, layers=[1, 3])
    fitted = modify.fit_thresholds(model, [torch.randint(3, 97, (4, 16), generator=torch.Generator().manual_seed(1))])
    if checkpointing != "off":
        kwargs = {"use_reentrant": checkpointing == "reentrant"}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    model(IDS, labels=IDS, use_cache=False).loss.backward()
    moved = [float(block.mod_router.threshold) for block, _ in routed_blocks(model)]
    assert all(a != b for a, b in zip(moved, fitted, strict=True))  # the step's batch did move each threshold
    return moved


@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
def test_the_threshold_moves_once_per_step(checkpointing: str) -> None:
    assert _thresholds_after_a_step(checkpointing) == _thresholds_after_a_step("off")
