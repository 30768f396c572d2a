"""``modify.fit_thresholds`` on padded batches (issue 30, item 5): the quantile is taken over the real tokens
only, and the always-processed leading tokens left out are each row's first real ones, wherever the padding is.
So on the text it was fitted on, each block's threshold passes its capacity's share of the real tokens."""

from __future__ import annotations

import pytest
import torch

import modify
from modify.api import routed_blocks
from modify.testing import tiny_model

CAPACITY = 0.25
LENGTHS = [24, 12, 8, 4]


def _routed() -> torch.nn.Module:
    model = modify.convert(tiny_model("llama"), capacity=CAPACITY, layers=[1, 3], keep_first=1)
    gen = torch.Generator().manual_seed(1)
    for block, _ in routed_blocks(model):
        block.mod_router.weight.data = torch.randn(block.mod_router.weight.shape, generator=gen) * 0.5
    return model


def _padded(side: str) -> dict[str, torch.Tensor]:
    """The four sequences padded to the longest on ``side``, with the mask and the positions of each real token."""
    gen = torch.Generator().manual_seed(0)
    width = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        span = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, span] = torch.randint(3, 97, (n,), generator=gen)
        mask[row, span] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def _shares(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[float]:
    """Per routed block: the share of real tokens, the leading one of each row left out, scoring above the
    block's threshold (what the causal rule processes)."""
    real = batch["attention_mask"].bool()
    counted = real & (real.cumsum(-1) > 1)
    found: dict[int, float] = {}
    handles = []
    for _, state in routed_blocks(model):

        def observe(s, idx, gate, _state=state):  # type: ignore[no-untyped-def]
            found[_state.index] = float((s[counted] > _state.threshold).float().mean())

        handles.append(state.hooks.add_selection(observe))
    modify.modes.run_topk(model, [batch], handles)
    return [found[i] for i in sorted(found)]


@pytest.mark.parametrize("side", ["left", "right"])
def test_thresholds_pass_the_capacity_share_of_real_tokens(side: str) -> None:
    model = _routed()
    batch = _padded(side)
    modify.fit_thresholds(model, [batch])
    real_tokens = sum(n - 1 for n in LENGTHS)  # the quantile's resolution: one token of those counted
    for share in _shares(model, batch):
        assert abs(share - CAPACITY) <= 1.0 / real_tokens


def test_padding_does_not_move_the_thresholds() -> None:
    """Left- and right-padded, the same real tokens (at the same positions) give the same thresholds."""
    thresholds = []
    for side in ("left", "right"):
        model = _routed()
        thresholds.append(modify.fit_thresholds(model, [_padded(side)]))
    torch.testing.assert_close(torch.tensor(thresholds[0]), torch.tensor(thresholds[1]))
