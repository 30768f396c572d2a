"""The decode step's fast path: one new token per row, continuing a cache (the call ``generate()`` repeats).

The per-token path (:mod:`modify.routing.ragged`, :func:`modify.routing.kv_all.kv_all_per_token`) serves any
selection: it sorts each row's processed tokens into slots, rebuilds the mask from positions and writes the
cache through a stand-in. A decode step has one token per row, so the decision is one bool per row and
the work is known once it is read (the block's one host synchronisation of the step, ``nonzero``):

- **no row processes it:** ``kv="routed"``: the block's layer of the cache gets one hidden zero position,
  as the per-token path writes; ``kv="all"``: the key/value side runs on every row and writes the layer;
- **every row processes it:** the block's own computation on the call's own arguments and the real cache,
  nothing gathered or scattered; ``x + g·part`` per part, the routed call's additions at one position;
- **some rows:** those rows as a tight batch (every per-row argument ``index_select``-ed), their result
  copied back into the others' unchanged hidden states.

``kv="all"``: the key/value side runs on every row; the processed rows' query side attends to their rows of it
through the model's own mask (the layer is the dense model's). ``kv="routed"``: the processed rows run the
block's Δ graph, attending through a mask of the positions their layer holds keys at (:class:`History`); with
some rows only, the cache is written through the follower's stand-in (hidden zeros in the other rows).

Before (the per-token path, a decode step at batch B)::

    scores ─rule─▶ process [B, 1] ─argsort─▶ slots [B, kmax] ─gather x, args─▶ mask from positions ─▶ stand-in
        ─▶ Δ graph ─▶ scatter-add g·parts at the slots

After::

    scores ─rule─▶ process [B, 1] ─nonzero─▶ rows [b] ─index_select args (b < B)─▶ Δ graph (real cache if b = B)
        ─▶ x[rows] + g·parts ─index_copy (b < B)─▶ y
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modify.passes.capture_block import call_structure
from modify.routing.arguments import BlockCall, mask_allows, replace_at
from modify.routing.ragged import History, as_mask, cache_follower, key_width, layer_columns, select_rows
from modify.routing.router import ROUTER_ATTR
from modify.routing.skip_path import SKIP_ATTR

__all__ = ["fast_decode", "decode_step"]


def fast_decode(call: BlockCall, history: History | None, kv: str) -> bool:
    """Whether :func:`decode_step` serves the call: one token per row, continuing a cache whose block layer
    already holds positions (``kv="routed"``: ``history`` is that layer's)."""
    if call.cache is None or call.x.shape[1] != 1:
        return False
    return kv == "all" or (history is not None and history.valid.shape[1] > 0)


def _add_parts(x: torch.Tensor, parts: Any, gate: torch.Tensor) -> torch.Tensor:
    """``x + Σ g·part`` in the part order, with the float operations of the routed call at one position."""
    y = x
    for part in parts if isinstance(parts, (tuple, list)) else (parts,):
        if part.dtype != y.dtype:
            dtype = torch.promote_types(y.dtype, part.dtype)
            y, part = y.to(dtype), part.to(dtype)
        y = y + part * gate[..., None].to(part.dtype)
    return y


def _with_rows(y_rows: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return y_rows if rows is None else x.to(y_rows.dtype).index_copy(0, rows, y_rows)


def _split_outputs(out: Any, tuple_output: bool) -> tuple[Any, tuple[Any, ...]]:
    return (out[0], tuple(out[1:])) if tuple_output else (out, ())


def _kv_all(
    block: nn.Module, state: Any, call: BlockCall, gate: Any, rows: torch.Tensor | None, count: int
) -> tuple[torch.Tensor, tuple[Any, ...]]:
    named, x = call.named, call.x
    batch = x.shape[0]
    structure, leaves = call_structure(named, block.training)
    if count == batch:
        # every row: the block's Δ graph as it is, its layer the dense model's (the split's two sides in one)
        out, rest = _split_outputs(state.graph(block, structure)(*leaves), state.spec.output_is_tuple)
        return _add_parts(x, out, gate), rest
    split = state.program.split(block, structure, leaves, state.name)
    key, value, mask = split.kv(*leaves)
    if count == 0:
        return x, ()
    named = {k: select_rows(v, rows, batch) for k, v in named.items()}
    key, value = key.index_select(0, rows), value.index_select(0, rows)
    if mask is not None and mask.shape[0] == batch:
        mask = mask.index_select(0, rows)
    _, leaves = call_structure(named, block.training)
    out, rest = _split_outputs(split.query(*leaves, key, value, mask), state.spec.output_is_tuple)
    return _with_rows(_add_parts(named[state.spec.hidden], out, gate), x, rows), rest


def _layer_mask(call: BlockCall, layer: int, rows: torch.Tensor | None, history: History) -> torch.Tensor:
    """[b, 1, 1, S] the keys a decoding token of ``rows`` may attend to in a ``kv="routed"`` layer: the positions
    holding a processed token's key (this step's included) that the model's own mask allows."""
    mask, total = call.mask, history.valid.shape[1]
    _, columns = layer_columns(history.valid, key_width(mask, cache_follower(), call.cache[1], layer, total), total)
    allowed = select_rows(columns, rows, history.valid.shape[0])[:, None, None, :]
    if mask is not None:
        own = mask if mask.shape[0] == 1 or rows is None else mask.index_select(0, rows)
        allowed = allowed & mask_allows(own)
    return as_mask(allowed, mask, call.x.dtype)


def _kv_routed(
    block: nn.Module, state: Any, call: BlockCall, gate: Any, rows: torch.Tensor | None, count: int,
    history: History,
) -> tuple[torch.Tensor, tuple[Any, ...]]:  # fmt: skip
    spec, x = state.spec, call.x
    batch = x.shape[0]
    follower, (cache_arg, cache), layer = cache_follower(), call.cache, state.cache_layer
    if count == 0:
        follower.fill_skipped(cache, layer, 1)
        return x, ()
    named = {k: select_rows(v, rows, batch) for k, v in call.named.items()} if rows is not None else dict(call.named)
    if spec.pairwise is not None and spec.pairwise[0] in named:
        key = spec.pairwise[0]
        named[key] = replace_at(named[key], spec.pairwise[1:], _layer_mask(call, layer, rows, history))
    # every row writes its real key (an appending layer grows by one); some rows: the others get hidden zeros
    if rows is not None:
        slot = torch.zeros(count, 1, dtype=torch.int64, device=x.device)
        valid = torch.ones(count, 1, dtype=torch.bool, device=x.device)
        named[cache_arg] = follower.stand_in(cache, layer, slot, valid, rows, batch, 1)
    structure, leaves = call_structure(named, block.training)
    out, rest = _split_outputs(state.graph(block, structure)(*leaves), spec.output_is_tuple)
    return _with_rows(_add_parts(named[spec.hidden], out, gate), x, rows), rest


def decode_step(
    block: nn.Module, state: Any, call: BlockCall, scores: torch.Tensor, process: torch.Tensor,
    history: History | None,
) -> Any:  # fmt: skip
    """A routed block's decode step (see the module docstring): ``process`` [B, 1] is the causal rule's decision
    (or top-k's, which keeps the one token), ``history`` the ``kv="routed"`` layer's, before this step."""
    x = call.x
    batch = x.shape[0]
    rows = process[:, 0].nonzero()[:, 0]  # the block's one host synchronisation in this step
    count = rows.shape[0]
    sub = None if count == batch else rows
    gate = getattr(block, ROUTER_ATTR).gate(scores if sub is None else scores.index_select(0, rows)) if count else None
    if state.kv == "all":
        y, rest = _kv_all(block, state, call, gate, sub, count)
    else:
        assert history is not None
        history.valid = torch.cat([history.valid, process], dim=1)
        history.real = history.real + call.real().sum(-1)
        y, rest = _kv_routed(block, state, call, gate, sub, count, history)
    skip = getattr(block, SKIP_ATTR, None)
    if skip is not None and count < batch:
        skipped = call.real() & ~process
        y = y + skip(state.skip_input(block, x)).to(y.dtype) * skipped[..., None].to(y.dtype)
    if state.spec.output_is_tuple:
        return (y, *rest) if rest else (y, None)
    return y
