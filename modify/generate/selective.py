"""The routed forward on a per-token selection: causal routing, and every call that extends a key-value cache.

Top-k routing (:func:`modify.routing.routed_forward`) picks the same number of tokens in every sequence, over
the whole sequence. Sampling can't: each new token must decide alone (:mod:`modify.generate.causal`), so the
number of tokens a block processes varies by row and by step. Here a [B, q] boolean ``process`` decides, and:

- rows that process nothing are left out of the block's call (at batch 1, a skipped token doesn't touch the
  block's weights at all); the others gather their processed tokens into kmax slots (kmax = the largest
  count), the spare slots of shorter rows filled with skipped positions whose gate is 0;
- the block's attention mask is rebuilt from positions: a slot attends to the processed tokens at or before
  it, so a skipped token is never attended to in this block, and spare slots change nothing;
- with a cache, the block's layer of the cache keeps one entry per position, as in the dense model: the
  processed tokens' keys and values, zeros at skipped positions, which the rebuilt mask hides. So every layer
  of the cache keeps the same length, and Hugging Face's masks, positions and cache bookkeeping, computed
  once per step for all layers, stay right. (A compact cache, without the hidden zeros, would save memory.)
  Which positions of a block's layer hold real keys is kept beside the cache, keyed by the layer.

Positions stay the original ones: position ids and rotary tables are gathered like the hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modify.kernels import gated_scatter_add, gather_tokens

__all__ = ["selective_forward", "find_cache", "cached_length", "history_of", "mark_topk_filled", "hold_positions"]

#: Attribute of a cache object holding, per cache layer, which positions of the layer are real keys.
HISTORY_ATTR = "_modify_history"


@dataclass
class _History:
    valid: torch.Tensor  # [B, L] bool: the positions of this layer that hold a processed token's key
    real: torch.Tensor  # [B] int64: real (not padding) tokens seen so far, for keep_first


_TOPK_FILLED = "top-k"


def find_cache(named: dict[str, Any]) -> tuple[str, Any] | None:
    """The (argument name, cache) of a block call that carries a Hugging Face cache, else None."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # plain torch models: no cache to follow
        return None

    return next(((k, v) for k, v in named.items() if isinstance(v, Cache)), None)


def cached_length(cache: Any, layer: int) -> int:
    return int(cache.get_seq_length(layer)) if layer < len(cache.layers) else 0


def mark_topk_filled(cache: Any, layer: int) -> None:
    """Note that a top-k forward wrote this layer: only its routed tokens' keys, not one per position."""
    cache.__dict__.setdefault(HISTORY_ATTR, {})[layer] = _TOPK_FILLED


#: Cache layers whose update appends along the sequence, as the hidden zeros of skipped positions need.
_APPENDING_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


def hold_positions(cache: Any, layer: int, x: torch.Tensor) -> None:
    """Keep count of the positions of ``x`` [B, T, D] in a removed block's layer of the cache (capacity 0).

    The block's attention never runs, but transformers reads every step's positions and mask sizes off the first
    attention layer of the cache (``get_seq_length()``, ``get_mask_sizes``), which may be this one. So the layer
    gets one [B, 1, T, 1] zero entry per call: the length is right, no key is ever attended to (nothing reads
    them), and it costs B·T numbers instead of the B·H·T·d of real keys and values. A layer of another kind
    (static, quantized: fixed shapes) is refused; a linear-attention layer keeps no length and is left alone.
    """
    from transformers.cache_utils import CacheLayerMixin

    if layer < len(cache.layers):
        current = cache.layers[layer]
        kind = type(current).__name__
        if not isinstance(current, CacheLayerMixin):
            return
        if kind not in _APPENDING_LAYERS:
            raise ValueError(
                f"a {kind} cache can't hold a removed block (capacity 0), whose layer only counts positions; use "
                "the default dynamic cache (drop cache_implementation), or export the plan with 'modify export'"
            )
    marker = x.new_zeros(x.shape[0], 1, x.shape[1], 1)
    cache.update(marker, marker, layer)


def history_of(cache: Any, layer: int, batch: int, device: torch.device) -> _History:
    kind = type(cache.layers[layer]).__name__ if layer < len(cache.layers) else "DynamicLayer"
    if kind not in _APPENDING_LAYERS:
        raise ValueError(
            f"a {kind} cache is not supported with causal routing (routed layers keep one appended entry per "
            "position); use the default dynamic cache (drop cache_implementation)"
        )
    store: dict[int, Any] = cache.__dict__.setdefault(HISTORY_ATTR, {})
    length = cached_length(cache, layer)
    h = store.get(layer)
    if h is _TOPK_FILLED and length > 0:
        raise ValueError(
            "this cache was filled by a top-k forward, which keeps only the routed tokens' keys, so it can't be "
            "continued; call modify.set_routing(model, 'causal') before the first forward, or use generate()"
        )
    if not isinstance(h, _History) or length == 0:
        # A fresh cache, or one a dense call filled (routing disabled): every cached position is real.
        h = _History(
            torch.ones(batch, length, dtype=torch.bool, device=device),
            torch.full((batch,), length, dtype=torch.int64, device=device),
        )
        store[layer] = h
    if h.valid.shape[0] != batch:
        raise ValueError(
            f"the cache holds {h.valid.shape[0]} sequences but the call has {batch}; causal routing follows each "
            "sequence's cache, so beam search and batch changes mid-generation are not supported (use greedy or "
            "sampling)"
        )
    return h


class _SelectedCache:
    """Stands in for the cache inside one routed call: the block's key/value update, made for the kmax
    gathered slots of the rows that run, is written back at the tokens' own positions, zeros elsewhere."""

    def __init__(self, cache: Any, layer: int, idx: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor | None,
                 batch: int, length: int) -> None:  # fmt: skip
        self._cache, self._layer, self._idx, self._valid = cache, layer, idx, valid
        self._rows, self._batch, self._length = rows, batch, length

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)

    def _place(self, states: torch.Tensor) -> torch.Tensor:
        b, h, _, d = states.shape
        index = self._idx[:, None, :, None].expand(b, h, -1, d)
        # scatter_add onto zeros: spare slots add 0 at a skipped position, whatever order the adds take
        placed = states.new_zeros(b, h, self._length, d).scatter_add(
            2, index, states * self._valid[:, None, :, None].to(states.dtype)
        )
        if self._rows is None:
            return placed
        full = states.new_zeros(self._batch, h, self._length, d)
        return full.index_copy(0, self._rows, placed)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
        if layer_idx != self._layer:
            return self._cache.update(key_states, value_states, layer_idx, *args, **kwargs)
        keys, values = self._cache.update(
            self._place(key_states), self._place(value_states), layer_idx, *args, **kwargs
        )
        if self._rows is None:
            return keys, values
        return keys.index_select(0, self._rows), values.index_select(0, self._rows)


def _fill_skipped(cache: Any, layer: int, length: int) -> None:
    """Write ``length`` hidden zero positions into the block's layer of the cache (nobody processed them)."""
    keys, values = cache.layers[layer].keys, cache.layers[layer].values
    zk = keys.new_zeros(keys.shape[0], keys.shape[1], length, keys.shape[3])
    zv = values.new_zeros(values.shape[0], values.shape[1], length, values.shape[3])
    cache.update(zk, zv, layer)


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    items = list(value)
    items[path[0]] = _replace(items[path[0]], path[1:], new)
    return type(value)(items)


def _rows(value: Any, rows: torch.Tensor | None, batch: int) -> Any:
    if rows is None:
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, rows, batch) for v in value)
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows)
    return value


def _as_mask(allowed: torch.Tensor, like: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``allowed`` [b, 1, k, n] in the form of the model's mask: bool stays bool; else additive (eager adds it)."""
    if like is not None and like.dtype == torch.bool:
        return allowed
    dtype = like.dtype if like is not None else dtype
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def selective_forward(
    block: nn.Module,
    state: Any,
    named: dict[str, Any],
    x: torch.Tensor,
    scores: torch.Tensor,
    process: torch.Tensor,
    mask: torch.Tensor | None,
    padding: torch.Tensor | None,
    cache_arg: tuple[str, Any] | None,
    history: _History | None,
) -> Any:
    """Run ``block`` on the tokens ``process`` [B, q] selects and add ``g(r)·Δ`` back; see the module docstring.

    ``mask`` is the call's 4-D attention mask (None when the model passes none), ``padding`` [B, q] read from it.
    """
    from modify.router import ROUTER_ATTR
    from modify.routing import _gather_value
    from modify.skip_path import SKIP_ATTR

    spec = state.spec
    batch, length, _ = x.shape
    layer = state.cache_layer
    cache = cache_arg[1] if cache_arg is not None else None
    past = history.valid.shape[1] if history is not None else 0
    ready = cache is None or cached_length(cache, layer) > 0
    real = ~padding if padding is not None else torch.ones_like(process)
    if history is not None:
        history.valid = torch.cat([history.valid, process], dim=1)
        history.real = history.real + real.sum(-1)
    counts = process.sum(-1)
    kmax = int(counts.max())
    y = x
    out_rest: tuple[Any, ...] = ()
    if kmax == 0 and ready:
        if cache is not None:
            _fill_skipped(cache, layer, length)
    else:
        # A layer of the cache that has never been written has no shape to fill with zeros: run one spare slot
        # (gate 0, its key hidden) so that the block writes the layer itself.
        slots = max(kmax, 1)
        order = torch.argsort((~process).to(torch.int8), dim=-1, stable=True)[:, :slots]
        valid = torch.arange(slots, device=x.device) < counts[:, None]
        rows = (counts > 0).nonzero().squeeze(1) if kmax > 0 else torch.zeros(1, dtype=torch.int64, device=x.device)
        sub = None if rows.numel() == batch else rows
        idx, valid = _rows(order, sub, batch), _rows(valid, sub, batch)
        mask_path = spec.pairwise
        allowed = _allowed(mask, sub, idx, valid, history, past, length, cache is not None)
        new_mask = _as_mask(allowed, mask, x.dtype)
        gathered: dict[str, Any] = {}
        for key, value in named.items():
            if key == spec.hidden:
                gathered[key] = gather_tokens(_rows(x, sub, batch), idx)
            elif cache_arg is not None and key == cache_arg[0]:
                gathered[key] = _SelectedCache(cache, layer, idx, valid, sub, batch, length)
            elif mask_path is not None and key == mask_path[0]:
                gathered[key] = _replace(value, mask_path[1:], new_mask)
            else:
                gathered[key] = _gather_value(_rows(value, sub, batch), (key,), spec, idx, length)
        from modify.passes.capture_block import call_structure

        structure, leaves = call_structure(gathered, block.training)
        out = state.graph(block, structure)(*leaves)
        parts = out[0] if spec.output_is_tuple else out
        out_rest = tuple(out[1:]) if spec.output_is_tuple else ()
        router = getattr(block, ROUTER_ATTR)
        gate = router.gate(torch.gather(_rows(scores, sub, batch), 1, idx)) * valid
        ys = _rows(x, sub, batch)
        for part in parts:
            dtype = torch.promote_types(ys.dtype, part.dtype)
            ys = gated_scatter_add(ys.to(dtype), idx, part.to(dtype), gate)
        y = ys if sub is None else x.to(ys.dtype).index_copy(0, rows, ys)
    skip = getattr(block, SKIP_ATTR, None)
    skipped = real & ~process
    if skip is not None and bool(skipped.any()):
        estimate = skip(state.skip_input(block, x)).to(y.dtype)
        y = y + estimate * skipped[..., None].to(y.dtype)
    if spec.output_is_tuple:
        return (y, *out_rest) if out_rest else (y, None)
    return y


def _allowed(
    mask: torch.Tensor | None,
    sub: torch.Tensor | None,
    idx: torch.Tensor,
    valid: torch.Tensor,
    history: _History | None,
    past: int,
    length: int,
    cached: bool,
) -> torch.Tensor:
    """[b, 1, k, n] bool: which keys each gathered slot may attend to in this block.

    Without a cache the keys are the slots themselves (n = k); with one they are the layer's cached positions
    after this call's update (n = the mask's width, or everything cached). A processed slot sees the processed
    positions at or before it that the model's own mask allows (padding, sliding windows); a spare slot sees
    only its own (hidden, unused) key, so that no row of the softmax is empty.
    """
    from modify.routing import mask_allows

    batch = idx.shape[0]
    base = None  # [b, q, n] what the model's own mask allows, for the rows that run
    if mask is not None:
        rows_mask = _rows(mask, sub, mask.shape[0]) if mask.shape[0] > 1 else mask.expand(batch, *mask.shape[1:])
        base = mask_allows(rows_mask[:, 0])
    if not cached:
        pos = idx
        allowed = (pos[:, None, :] <= pos[:, :, None]) & valid[:, None, :]
        if base is not None:
            rows = torch.arange(batch, device=idx.device)[:, None, None]
            allowed &= base[rows, idx[:, :, None], idx[:, None, :]]
        allowed |= torch.eye(idx.shape[1], dtype=torch.bool, device=idx.device) & ~valid[:, :, None]
        return allowed[:, None]
    assert history is not None
    total = past + length
    width = mask.shape[-1] if mask is not None else total
    cols = torch.arange(total - width, total, device=idx.device)
    col_valid = _rows(history.valid[:, -width:], sub, history.valid.shape[0])
    here = past + idx
    allowed = (cols[None, None, :] <= here[:, :, None]) & col_valid[:, None, :]
    if base is not None:
        allowed &= torch.gather(base, 1, idx[:, :, None].expand(-1, -1, width))
    allowed |= (cols[None, None, :] == here[:, :, None]) & ~valid[:, :, None]
    return allowed[:, None]
