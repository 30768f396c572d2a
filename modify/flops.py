"""Analytic forward FLOPs of a model, dense and as converted.

Counted as ``torch.utils.flop_counter`` counts: matrix products only, a multiply-add is 2 FLOPs.
Per token, a linear layer costs 2·in·out; per sequence, attention costs 2·Tq·Tk·H·d for the scores and as
much again for the weighted values (H heads of size d, the full Tq×Tk square, as eager attention computes
it). A routed block runs its linears and attention on k = ceil(c·T) tokens, its router on all T, and its
skip path (if any, :mod:`modify.skip_path`) on the other T - k.
Embedding lookups, norms and elementwise ops cost nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from modify.archs import LINEAR_WEIGHT_LAYOUT
from modify.passes.find_block_stack import find_block_stack
from modify.router import PREDICTOR_ATTR, ROUTER_ATTR
from modify.routing import STATE_ATTR, capacity_tokens
from modify.skip_path import SKIP_ATTR, skip_path_flops

__all__ = ["FlopCount", "flops", "block_flops", "routed_block_flops", "attention_width"]


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs: ``dense`` for the original model, ``routed`` for the model as converted.

    ``blocks`` holds ``(dense, routed)`` for each block of the stack, in order.
    """

    dense: int
    routed: int
    blocks: tuple[tuple[int, int], ...] = ()

    @property
    def ratio(self) -> float:
        return self.routed / self.dense


def _linear_flops_per_token(module: nn.Module, skip: set[int]) -> int:
    total = 0
    for m in module.modules():
        layout = LINEAR_WEIGHT_LAYOUT.get(type(m).__name__)
        if layout is None or id(m) in skip:
            continue
        weight = m.weight
        total += 2 * weight.shape[0] * weight.shape[1]
    return total


def attention_width(model: nn.Module) -> int:
    """H·d, the summed width of the attention heads."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        return 0
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim


def block_flops(block: nn.Module, attention_width: int, tokens: int) -> int:
    """FLOPs of one block's forward over one sequence of ``tokens`` tokens (router and skip path excluded)."""
    skip = {
        id(m)
        for attr in (ROUTER_ATTR, SKIP_ATTR, PREDICTOR_ATTR)
        if hasattr(block, attr)
        for m in getattr(block, attr).modules()
    }
    return _linear_flops_per_token(block, skip) * tokens + 4 * tokens * tokens * attention_width


def routed_block_flops(
    block: nn.Module,
    attention_width: int,
    capacity: float,
    seq_len: int,
    hidden_size: int,
    skip_path: str = "identity",
) -> int:
    """FLOPs of one routed block over one sequence: the block on k = ceil(c·T) tokens, its router on all T
    and its skip path on the T - k others."""
    k = capacity_tokens(capacity, seq_len)
    skipped = (seq_len - k) * skip_path_flops(skip_path, hidden_size)
    return block_flops(block, attention_width, k) + 2 * hidden_size * seq_len + skipped


def flops(model: nn.Module, seq_len: int, batch_size: int = 1) -> FlopCount:
    """Forward FLOPs of ``model`` on ``batch_size`` sequences of ``seq_len`` tokens.

    Returns:
        ``dense``: the model without routing; ``routed``: the model as converted and as it runs now (equal
        to dense for a model that is not converted, or inside ``modify.routing_disabled``).
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    _, stack = find_block_stack(model)
    width = attention_width(model)
    in_blocks = {id(m) for m in stack.modules()}
    outside = sum(
        2 * m.weight.shape[0] * m.weight.shape[1]
        for m in model.modules()
        if type(m).__name__ in LINEAR_WEIGHT_LAYOUT and id(m) not in in_blocks
    )
    per_block = []
    for block in stack:
        full = block_flops(block, width, seq_len)
        state = getattr(block, STATE_ATTR, None)
        if state is None or not state.enabled:  # disabled (``routing_disabled``): the block runs densely
            per_block.append((full, full))
        else:
            hidden = getattr(block, ROUTER_ATTR).weight.shape[-1]
            routed = routed_block_flops(block, width, state.capacity, seq_len, hidden, state.skip_path)
            predictor = getattr(block, PREDICTOR_ATTR, None)  # the causal predictor reads every token
            if predictor is not None:
                routed += seq_len * sum(2 * m.weight.numel() for m in predictor.modules() if isinstance(m, nn.Linear))
            per_block.append((full, routed))
    dense = outside * seq_len + sum(d for d, _ in per_block)
    routed = outside * seq_len + sum(r for _, r in per_block)
    return FlopCount(
        dense * batch_size, routed * batch_size, tuple((d * batch_size, r * batch_size) for d, r in per_block)
    )
