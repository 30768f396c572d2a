"""The routed forward on a per-token selection: causal routing, and every call that extends a key-value cache.

Top-k routing picks the same number of tokens in every sequence, over the whole sequence. Sampling can't: each
new token must decide alone (:mod:`modify.routing.rules`), so the number of tokens a block processes varies by
row and by step. Here a [B, q] boolean ``process`` decides, and:

- rows that process nothing are left out of the block's call (at batch 1, a skipped token doesn't touch the
  block's weights at all); the others gather their processed tokens into kmax slots (kmax = the largest
  count), the spare slots of shorter rows filled with skipped positions whose gate is 0;
- the block's attention mask is rebuilt from positions: a slot attends to the processed tokens at or before
  it, so a skipped token is never attended to in this block, and spare slots change nothing;
- with a cache, the block's layer of the cache keeps one entry per position, as in the dense model: the
  processed tokens' keys and values, zeros at skipped positions, which the rebuilt mask hides. Which positions
  hold real keys is the :class:`History` the cache follower keeps (:class:`CacheFollower`, registered by
  :mod:`modify.generate`); the block writes through the follower's stand-in for the cache.

Positions stay the original ones: position ids and rotary tables are gathered like the hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from modify.routing.arguments import BlockCall, mask_allows, replace_at
from modify.routing.call import routed_delta
from modify.routing.router import ROUTER_ATTR
from modify.routing.skip_path import SKIP_ATTR

__all__ = [
    "History",
    "CacheFollower",
    "set_cache_follower",
    "cache_follower",
    "ragged_forward",
    "select_rows",
    "as_mask",
    "key_width",
    "layer_columns",
]


@dataclass
class History:
    """Per cache layer of a routed block: which positions hold a processed token's key."""

    valid: torch.Tensor  # [B, L] bool: the positions of this layer that hold a processed token's key
    real: torch.Tensor  # [B] int64: real (not padding) tokens seen so far, for keep_first


class CacheFollower(Protocol):
    """How routed blocks keep a key-value cache as the dense model would (one entry per position per layer)."""

    def cached(self, cache: Any, layer: int) -> int:
        """Positions the cache's ``layer`` holds."""

    def key_count(self, cache: Any, layer: int, total: int) -> int:
        """Keys the layer's update returns once it holds ``total`` positions: ``total``, or its fixed length."""

    def history(self, cache: Any, layer: int, batch: int, device: torch.device) -> History:
        """The layer's :class:`History`, kept beside the cache (every cached position real if none yet)."""

    def stand_in(self, cache: Any, layer: int, idx: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor | None,
                 batch: int, length: int) -> Any:  # fmt: skip
        """What the block is called with instead of the cache: writes the gathered slots' keys at their positions."""

    def fill_skipped(self, cache: Any, layer: int, length: int) -> None:
        """``length`` hidden zero positions in the layer: no token of the call ran the block."""

    def topk_filled(self, cache: Any, layer: int) -> None:
        """A top-k forward wrote the layer: only its routed tokens' keys, so it can't be continued."""

    def hold(self, cache: Any, layer: int, x: torch.Tensor) -> None:
        """A removed block's layer: count the positions of ``x`` without keys."""


_FOLLOWER: list[CacheFollower] = []


def set_cache_follower(follower: CacheFollower) -> None:
    """Register how routed blocks follow a cache (:mod:`modify.generate` does, on import)."""
    _FOLLOWER[:] = [follower]


def cache_follower() -> CacheFollower:
    if not _FOLLOWER:
        raise RuntimeError("a routed block was called with a cache but no cache follower is registered; import modify")
    return _FOLLOWER[0]


def select_rows(value: Any, rows: torch.Tensor | None, batch: int) -> Any:
    """``value`` (an argument of a call of ``batch`` rows, nested or not) at the ``rows`` only; all if None."""
    if rows is None:
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(select_rows(v, rows, batch) for v in value)
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows)
    return value


def as_mask(allowed: torch.Tensor, like: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``allowed`` [b, 1, k, n] in the form of the model's mask: bool stays bool; else additive (eager adds it)."""
    if like is not None and like.dtype == torch.bool:
        return allowed
    dtype = like.dtype if like is not None else dtype
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def ragged_forward(
    block: nn.Module, state: Any, call: BlockCall, scores: torch.Tensor, process: torch.Tensor,
    history: History | None,
) -> Any:  # fmt: skip
    """Run ``block`` on the tokens ``process`` [B, q] selects and add ``g(r)·Δ`` back; see the module docstring."""
    spec, x = state.spec, call.x
    batch, length, _ = x.shape
    layer = state.cache_layer
    cache = call.cache[1] if call.cache is not None else None
    follower = cache_follower() if cache is not None else None
    past = history.valid.shape[1] if history is not None else 0
    ready = follower is None or follower.cached(cache, layer) > 0
    real = call.real()
    if history is not None:
        history.valid = torch.cat([history.valid, process], dim=1)
        history.real = history.real + real.sum(-1)
    counts = process.sum(-1)
    kmax = int(counts.max())
    y, rest = x, None
    if kmax == 0 and ready:
        if follower is not None:
            follower.fill_skipped(cache, layer, length)
    else:
        # A layer of the cache that has never been written has no shape to fill with zeros: run one spare slot
        # (gate 0, its key hidden) so that the block writes the layer itself.
        slots = max(kmax, 1)
        order = torch.argsort((~process).to(torch.int8), dim=-1, stable=True)[:, :slots]
        valid = torch.arange(slots, device=x.device) < counts[:, None]
        rows = (counts > 0).nonzero().squeeze(1) if kmax > 0 else torch.zeros(1, dtype=torch.int64, device=x.device)
        sub = None if rows.numel() == batch else rows
        idx, valid = select_rows(order, sub, batch), select_rows(valid, sub, batch)
        width = None if follower is None else key_width(call.mask, follower, cache, layer, past + length)
        allowed = _allowed(call.mask, sub, idx, valid, history, past, length, width)
        named = {k: select_rows(v, sub, batch) for k, v in call.named.items()}
        given = set()  # arguments made for the gathered slots, not gathered from the call's
        if spec.pairwise is not None and spec.pairwise[0] in named:
            key = spec.pairwise[0]
            named[key] = replace_at(call.named[key], spec.pairwise[1:], as_mask(allowed, call.mask, x.dtype))
            given.add(key)
        if follower is not None:
            named[call.cache[0]] = follower.stand_in(cache, layer, idx, valid, sub, batch, length)
            given.add(call.cache[0])
        gate = getattr(block, ROUTER_ATTR).gate(torch.gather(select_rows(scores, sub, batch), 1, idx)) * valid
        ys, rest = routed_delta(block, state, named, idx, gate, given)
        y = ys if sub is None else x.to(ys.dtype).index_copy(0, rows, ys)
    skip = getattr(block, SKIP_ATTR, None)
    skipped = real & ~process
    if skip is not None and bool(skipped.any()):
        estimate = skip(state.skip_input(block, x)).to(y.dtype)
        y = y + estimate * skipped[..., None].to(y.dtype)
    if spec.output_is_tuple:
        return (y, *rest) if rest else (y, None)
    return y


def key_width(mask: torch.Tensor | None, follower: CacheFollower, cache: Any, layer: int, total: int) -> int:
    """Key columns a routed layer's attention sees once it holds ``total`` positions: the mask's width, or
    without a mask what the layer's update returns."""
    return mask.shape[-1] if mask is not None else follower.key_count(cache, layer, total)


def layer_columns(valid: torch.Tensor, width: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions [n] of a mask's ``width`` key columns, and [B, n] which of them hold a processed token's key,
    for a layer holding ``total`` positions whose ``valid`` [B, total] is known: the last ``width`` positions
    (a growing cache; a sliding window's mask is narrower), or, for a cache of fixed length (static: the mask is
    wider than what is written), positions 0 to ``width``, those not yet written invalid."""
    if width <= total:
        return torch.arange(total - width, total, device=valid.device), valid[:, total - width :]
    unwritten = valid.new_zeros(valid.shape[0], width - total)
    return torch.arange(width, device=valid.device), torch.cat([valid, unwritten], dim=1)


def _allowed(
    mask: torch.Tensor | None,
    sub: torch.Tensor | None,
    idx: torch.Tensor,
    valid: torch.Tensor,
    history: History | None,
    past: int,
    length: int,
    width: int | None,
) -> torch.Tensor:
    """[b, 1, k, n] bool: which keys each gathered slot may attend to in this block.

    Without a cache (``width`` None) the keys are the slots themselves (n = k); with one they are the ``width``
    key columns the layer's update returns (the mask's width; :func:`layer_columns`). A processed slot sees the
    processed positions at or before it that the model's own mask allows (padding, sliding windows); a spare slot
    sees only its own (hidden, unused) key, so that no row of the softmax is empty.
    """
    batch = idx.shape[0]
    base = None  # [b, q, n] what the model's own mask allows, for the rows that run
    if mask is not None:
        rows_mask = select_rows(mask, sub, mask.shape[0]) if mask.shape[0] > 1 else mask.expand(batch, *mask.shape[1:])
        base = mask_allows(rows_mask[:, 0])
    if width is None:
        pos = idx
        allowed = (pos[:, None, :] <= pos[:, :, None]) & valid[:, None, :]
        if base is not None:
            rows = torch.arange(batch, device=idx.device)[:, None, None]
            allowed &= base[rows, idx[:, :, None], idx[:, None, :]]
        allowed |= torch.eye(idx.shape[1], dtype=torch.bool, device=idx.device) & ~valid[:, :, None]
        return allowed[:, None]
    assert history is not None
    cols, col_valid = layer_columns(history.valid, width, past + length)
    col_valid = select_rows(col_valid, sub, history.valid.shape[0])
    here = past + idx
    allowed = (cols[None, None, :] <= here[:, :, None]) & col_valid[:, None, :]
    if base is not None:
        allowed &= torch.gather(base, 1, idx[:, :, None].expand(-1, -1, width))
    allowed |= (cols[None, None, :] == here[:, :, None]) & ~valid[:, :, None]
    return allowed[:, None]
