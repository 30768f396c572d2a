"""How often a causal rule decides as top-k would: ``modify.measure_agreement``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from modify.modes import run_topk
from modify.routing.rules import decide, decided_tokens
from modify.routing.selection import keep_mask
from modify.routing.state import routed_blocks

__all__ = ["measure_agreement"]


@torch.no_grad()
def measure_agreement(model: nn.Module, batches: Iterable[Any]) -> dict[int, dict[str, float]]:
    """Per routed block: how often the causal decision equals top-k membership on ``batches``.

    The model runs top-k routing (the computation it was trained with); each token a block decides (not
    padding, not an always-processed leading token) counts once. Returns, per block index, ``agreement``
    (share of equal decisions), ``causal_share`` (share the causal rule processes) and ``topk_share``.
    """
    found = [state for _, state in routed_blocks(model)]
    totals = {s.index: torch.zeros(4, dtype=torch.float64) for s in found}

    def counter(state: Any) -> Any:
        def count(block: nn.Module, x: torch.Tensor, scores: torch.Tensor, idx: torch.Tensor, padding: Any) -> None:
            if state.capacity >= 1.0:
                return
            member = keep_mask(idx, scores.shape[-1])
            decided = decided_tokens(state, ~padding if padding is not None else torch.ones_like(member))
            causal = decide(state, block, x, scores)
            stats = [(causal == member) & decided, causal & decided, member & decided, decided]
            totals[state.index] += torch.stack([s.sum() for s in stats]).double().cpu()

        return count

    run_topk(model, batches, [s.hooks.add_topk(counter(s)) for s in found])
    result = {}
    for index, total in totals.items():
        agree, causal, member, count = total.tolist()
        if count:
            result[index] = {"agreement": agree / count, "causal_share": causal / count, "topk_share": member / count}
    return result
