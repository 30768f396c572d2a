"""modify.flops against torch's FlopCounterMode on eager-attention models (whose matmuls it counts)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import modify
from modify.flops import flop_counter
from modify.testing import FAMILIES, tiny_model
from modify.testing.matrix import build, eager_experts


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


def _measured_eager_experts(model: torch.nn.Module, batch: int, length: int) -> int:
    """torch's own counter, with experts run as a loop of linears (which it sees) instead of grouped matmuls."""
    with eager_experts(model):
        return _measured(model, batch, length)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "olmoe"])
def test_experts_and_latent_attention_are_counted_as_they_run(family: str) -> None:
    """Experts stored as 3-D parameters and run as grouped matmuls (which FlopCounterMode alone doesn't see),
    shared experts, latent attention: counted from the probe, equal to the counter on the eager loop."""
    model = build(family)
    assert model.config._experts_implementation != "eager"
    batch, length = 2, 40
    dense = _measured_eager_experts(model, batch, length)
    with torch.no_grad(), FlopCounterMode(display=False) as plain:
        model(torch.randint(3, 97, (batch, length)), use_cache=False)
    with torch.no_grad(), flop_counter() as extended:
        model(torch.randint(3, 97, (batch, length)), use_cache=False)
    assert plain.get_total_flops() < dense == extended.get_total_flops()
    modify.convert(model, capacity=0.25, layers="every-other")
    count = modify.flops(model, length, batch)
    assert (count.dense, count.routed) == (dense, _measured_eager_experts(model, batch, length))


def test_linear_subclasses_with_names_of_their_own_are_counted() -> None:
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp.down_proj.__class__ = type("QuantLinear", (torch.nn.Linear,), {})
    assert modify.flops(model, 32, 2).dense == _measured(model, 2, 32)


class _ChunkedBlock(torch.nn.Module):
    """A residual block that pads its tokens to a multiple of 16 (as chunked linear attention does)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = -x.shape[1] % 16
        h = self.proj(torch.nn.functional.pad(x, (0, 0, 0, pad)))
        return x + h[:, : x.shape[1]]


class _ChunkedModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_ChunkedBlock() for _ in range(3))
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_blocks_whose_cost_is_not_polynomial_are_measured_at_each_length() -> None:
    model = _ChunkedModel()

    def inputs(length: int) -> dict:
        return {"x": torch.randn(1, length, 8)}

    for length in (5, 16, 17, 40):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**inputs(length))
        assert modify.flops(model, length, example_inputs=inputs).dense == counter.get_total_flops()
