"""modify.flops against torch's FlopCounterMode on eager-attention models (whose matmuls it counts)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import modify
from modify.testing import FAMILIES, tiny_model


def _measured(model: torch.nn.Module, batch: int, length: int) -> int:
    ids = torch.randint(3, 97, (batch, length))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids, use_cache=False)
    return counter.get_total_flops()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_analytic_flops_match_flop_counter(family: str) -> None:
    model = tiny_model(family)
    batch, length = 2, 64
    dense_measured = _measured(model, batch, length)
    modify.convert(model, capacity=0.125, layers="all")
    routed_measured = _measured(model, batch, length)
    count = modify.flops(model, length, batch)
    assert count.dense == pytest.approx(dense_measured, rel=0.02)
    assert count.routed == pytest.approx(routed_measured, rel=0.02)
    # The analytic count is meant to be exact for these models; 2% is the contract for others.
    assert (count.dense, count.routed) == (dense_measured, routed_measured)
    # Every block at 12.5%: the blocks' share shrinks about eightfold; the LM head stays.
    assert count.routed < 0.5 * count.dense


def test_unconverted_model_routed_equals_dense() -> None:
    count = modify.flops(tiny_model("gpt2"), 32)
    assert count.routed == count.dense > 0


def test_flops_reject_bad_sizes() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        modify.flops(tiny_model("gpt2"), 0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("skip_path", ["linear", "mlp"])
def test_analytic_flops_count_skip_paths(family: str, skip_path: str) -> None:
    model = tiny_model(family)
    batch, length = 2, 64
    modify.convert(model, capacity=[0.25, 0.5], layers=[0, 1], skip_path=skip_path, skip_rank=8)
    count = modify.flops(model, length, batch)
    assert count.routed == _measured(model, batch, length)
    hidden = model.config.hidden_size
    pure = tiny_model(family)
    modify.convert(pure, capacity=[0.25, 0.5], layers=[0, 1])
    # The paths run on the 48 + 32 skipped tokens of each sequence, 4·D·r FLOPs each.
    extra = batch * (48 + 32) * 4 * hidden * 8
    assert count.routed - modify.flops(pure, length, batch).routed == extra


def test_disabled_routing_counts_as_dense() -> None:
    """Inside routing_disabled, or with a block's routing switched off (as ``modify bench`` runs a plan on a
    subset of the routed blocks), the block runs densely and counts so."""
    model = modify.convert(tiny_model("llama"), capacity=0.25, layers="all")
    routed = modify.flops(model, 32)
    assert routed.routed < routed.dense
    with modify.routing_disabled(model):
        assert modify.flops(model, 32).routed == routed.dense
    _, state = modify.api.routed_blocks(model)[0]
    state.enabled = False
    partial = modify.flops(model, 32)
    assert routed.routed < partial.routed < routed.dense
    assert partial.blocks[0][0] == partial.blocks[0][1] and partial.blocks[1][0] > partial.blocks[1][1]
