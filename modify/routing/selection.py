"""The selection rules' shared parts: how many tokens a capacity keeps, and the top-k rule itself.

A selection rule turns a block's scores into the tokens it processes, either as indices (top-k: the same
number in every row, ascending) or as a keep mask (the causal rules of :mod:`modify.routing.rules`, the
no-op's margin while sampling). Rules choose; they never run the block (:func:`modify.routing.call.routed_call`
does).
"""

from __future__ import annotations

import math

import torch

__all__ = ["capacity_tokens", "select_tokens", "skipped_tokens", "keep_mask"]


def capacity_tokens(capacity: float, length: int) -> int:
    """k = ceil(capacity · length), at least 1 and at most ``length``; 0 for capacity 0 (a removed block).

    The product is rounded to 6 decimals first, because capacities such as 0.3 are not exact in binary and
    ``0.3 * 10`` is 3.0000000000000004, whose ceiling would route one token too many. Any capacity above 0
    routes at least one token: only 0 means "none" (removal), however short the sequence.
    """
    if capacity <= 0.0:
        return 0
    return min(length, max(1, math.ceil(round(capacity * length, 6))))


def select_tokens(
    scores: torch.Tensor, k: int, padding: torch.Tensor | None = None, keep_first: int = 0
) -> torch.Tensor:
    """Indices of the k highest-scoring tokens of each row, ascending.

    Args:
        scores: [B, T] router scores.
        k: tokens to keep per row.
        padding: [B, T] bool, True at padding; padding is chosen only once a row runs out of real tokens.
        keep_first: the first ``keep_first`` real tokens of each row are always chosen. Pretrained models
            park attention on the first token (the attention sink); a routed block whose attention loses
            it degrades far more than one that loses any other token.

    Returns:
        [B, k] int64, sorted so that the routed tokens keep their order (attention stays causal).
    """
    length = scores.shape[-1]
    if k == length:
        return torch.arange(length, device=scores.device).expand(scores.shape[0], length)
    if keep_first > 0:
        real = ~padding if padding is not None else torch.ones_like(scores, dtype=torch.bool)
        leading = real & (real.cumsum(-1) <= keep_first)
        scores = scores.masked_fill(leading, float("inf"))
    if padding is not None:
        scores = scores.masked_fill(padding, float("-inf"))
    # A stable sort breaks ties towards earlier positions, so equal scores (a zero router) give the same
    # choice on every device and run; topk's tie order is unspecified.
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return order[:, :k].sort(dim=-1).values


def skipped_tokens(idx: torch.Tensor, length: int) -> torch.Tensor:
    """[B, T - k] int64: the positions ``idx`` [B, k] leaves out, ascending (a static shape, no sync)."""
    routed = torch.zeros(idx.shape[0], length, dtype=torch.int8, device=idx.device).scatter_(1, idx, 1)
    # A stable ascending sort puts the 0s (skipped) first, in positional order.
    return torch.argsort(routed, dim=-1, stable=True)[:, : length - idx.shape[1]]


def keep_mask(idx: torch.Tensor, length: int) -> torch.Tensor:
    """[B, T] bool, True at the positions ``idx`` [B, k] selects: top-k's choice as a keep mask."""
    return torch.zeros(idx.shape[0], length, dtype=torch.bool, device=idx.device).scatter_(1, idx, True)
