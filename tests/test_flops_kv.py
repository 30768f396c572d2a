"""modify.flops on ``kv="all"`` blocks (issue 28, cost): every token runs the key/value side, the routed tokens
the rest, with attention of k queries over T keys; checked against torch's FlopCounterMode."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import modify
from modify.flops import flop_counter, routed_block_flops
from modify.routing.state import routed_blocks
from modify.testing import tiny_model

BATCH, LENGTH = 2, 64

#: family -> (the modules that compute a block's keys and values, relative to the block; whether they also
#: compute its queries: a fused projection, which the query side then runs again on the routed tokens)
KV_MODULES = {
    "llama": (("self_attn.k_proj", "self_attn.v_proj"), False),
    "opt": (("self_attn.k_proj", "self_attn.v_proj"), False),
    "gpt2": (("attn.c_attn",), True),
    "gpt_neox": (("attention.query_key_value",), True),
}


def _measured(model: nn.Module, batch: int = BATCH, length: int = LENGTH, counter: type | None = None) -> int:
    ids = torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(1))
    mode = counter() if counter is not None else FlopCounterMode(display=False)
    with torch.no_grad(), mode:
        model(ids, use_cache=False)
    return mode.get_total_flops()


def _set_capacity(model: nn.Module, capacity: float) -> None:
    for _, state in routed_blocks(model):
        state.capacity = capacity


def _linear_flops(module: nn.Module) -> int:
    """FLOPs per token of a linear layer (nn.Linear's weight is [out, in], GPT-2's Conv1D's [in, out])."""
    return 2 * module.weight.numel()


def _kv_token_flops(model: nn.Module, family: str) -> int:
    block = routed_blocks(model)[0][0]
    return sum(_linear_flops(block.get_submodule(name)) for name in KV_MODULES[family][0])


def _pair_flops(model: nn.Module) -> int:
    """Attention FLOPs per (query, key) pair in one block: scores and weighted sum, 2 FLOPs per multiply-add."""
    config = model.config
    return 4 * config.hidden_size


@pytest.mark.parametrize("family", list(KV_MODULES))
def test_kv_all_counts_as_it_runs(family: str) -> None:
    converted = modify.convert(tiny_model(family), capacity=0.5, layers="all", kv="all")
    paper = modify.convert(tiny_model(family), capacity=0.5, layers="all")
    assert {s.kv for _, s in routed_blocks(converted)} == {"all"}
    blocks = len(routed_blocks(converted))
    kv_token, fused = _kv_token_flops(converted, family), KV_MODULES[family][1]
    for capacity in (0.5, 0.125):
        _set_capacity(converted, capacity)
        _set_capacity(paper, capacity)
        measured, measured_paper = _measured(converted), _measured(paper)
        count, count_paper = modify.flops(converted, LENGTH, BATCH), modify.flops(paper, LENGTH, BATCH)
        assert count.routed == pytest.approx(measured, rel=0.02)
        assert count.routed == measured  # exact for these models; 2% is the contract
        assert count_paper.routed == measured_paper
        # Counting kv="all" as the paper's block would be off: the counter sees the difference.
        assert count.routed != count_paper.routed
        assert count.dense == count_paper.dense > count.routed
        # Against the paper's block, each of the T - k skipped tokens costs its key/value projections (the input
        # norm is no matmul: 0 FLOPs to the counter) plus the k queries' attention to its key. A fused projection
        # runs on all T for the key/value side and again on the k routed tokens for the query side.
        k = math.ceil(capacity * LENGTH)
        skipped = LENGTH - k
        extra = (skipped + (k if fused else 0)) * kv_token + skipped * k * _pair_flops(converted)
        assert measured - measured_paper == BATCH * blocks * extra


def test_skipped_token_costs_the_key_value_side() -> None:
    """Between two capacities, each token moved from routed to skipped saves all of the block but the key/value
    projections (and its attention row): FlopCounterMode on llama, where the projections are separate."""
    model = modify.convert(tiny_model("llama"), capacity=0.5, layers="all", kv="all")
    blocks = len(routed_blocks(model))
    dense_model = tiny_model("llama")
    layer = dense_model.model.layers[0]
    token = sum(_linear_flops(m) for m in layer.modules() if isinstance(m, nn.Linear))  # every projection
    kv_token = _kv_token_flops(model, "llama")
    router = 2 * model.config.hidden_size
    costs = {}
    for capacity in (0.5, 0.25):
        _set_capacity(model, capacity)
        costs[capacity] = _measured(model)
        assert modify.flops(model, LENGTH, BATCH).routed == costs[capacity]
    k1, k2 = math.ceil(0.5 * LENGTH), math.ceil(0.25 * LENGTH)
    routed_token = token - kv_token + LENGTH * _pair_flops(model)  # a query over all T keys
    assert costs[0.5] - costs[0.25] == BATCH * blocks * (k1 - k2) * routed_token
    # What a skipped token still costs: the block at capacity c less k routed tokens is T·(key/value side).
    per_block = routed_block_flops(model, 1, 0.25, LENGTH, kv="all")
    assert per_block - k2 * routed_token - LENGTH * router == LENGTH * kv_token
    assert modify.flops(model, LENGTH, BATCH).blocks[1][1] == BATCH * per_block  # the two APIs agree
    assert per_block != routed_block_flops(model, 1, 0.25, LENGTH)  # kv="routed" on the same block


def test_kv_all_with_sdpa_counts_cpu_attention() -> None:
    """The bench's models run sdpa: its CPU kernel over k queries × T keys (and the gathered mask) is counted
    by modify's counter as the k×T rectangle."""
    model = modify.convert(tiny_model("llama", attn_implementation="sdpa"), capacity=0.25, layers="all", kv="all")
    measured = _measured(model, counter=flop_counter)
    assert modify.flops(model, LENGTH, BATCH).routed == measured
    eager = modify.convert(tiny_model("llama"), capacity=0.25, layers="all", kv="all")
    assert measured == _measured(eager)


def test_kv_all_cost_needs_a_kv_all_block() -> None:
    model = modify.convert(tiny_model("llama"), capacity=0.5, layers="all")
    with pytest.raises(ValueError, match="convert it with kv='all'"):
        routed_block_flops(model, 0, 0.5, LENGTH, kv="all")
    with pytest.raises(ValueError, match="unknown kv option 'foo'"):
        routed_block_flops(model, 0, 0.5, LENGTH, kv="foo")
