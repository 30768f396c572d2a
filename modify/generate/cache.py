"""How routed blocks follow a Hugging Face key-value cache: one entry per position per layer, as the dense model.

A routed block's layer of the cache keeps the processed tokens' keys and values and zeros at the positions the
block skipped, which the rebuilt mask hides (see :mod:`modify.routing.ragged`). So every layer keeps the same
length, and Hugging Face's masks, positions and cache bookkeeping, computed once per step for all layers,
stay right. (A compact cache, without the hidden zeros, would save memory.) Which positions of a block's layer
hold real keys is kept beside the cache (:data:`HISTORY_ATTR`), keyed by the layer, and is cut with the layer
when transformers crops the cache (assisted generation, prompt lookup).

Cache layers are told apart by what they do (:func:`layer_kind`): a layer whose update appends along the
sequence can hold the hidden zeros, and so can a static one (fixed length, written in place at the next
positions), whose mask is as wide as the cache; one that keeps a running state (linear attention's convolution
and recurrent states) has no per-position entry for a skipped token, and one that re-encodes its keys
(quantized, indexed) or a static sliding window is not one routing is tested with; both are refused with what
to do.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from modify.errors import UnsupportedModelError
from modify.routing.ragged import History

__all__ = ["HISTORY_ATTR", "KVCacheFollower", "layer_kind"]

#: Attribute of a cache object holding, per cache layer, which positions of the layer are real keys.
HISTORY_ATTR = "_modify_history"
_TOPK_FILLED = "top-k"
#: Cache layers whose update appends along the sequence, as the hidden zeros of skipped positions need.
_APPENDING_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")
#: Cache layers of a fixed length written in place at the next positions: a skipped position keeps its zeros.
_STATIC_LAYERS = ("StaticLayer",)


def layer_kind(layer: Any) -> str:
    """ "appending" (one entry per position, appended), "static" (one entry per position of a fixed length, written
    in place), "running state" (linear attention: a convolution and a recurrent state, no entry per position) or
    "other" (a static sliding window, quantized or indexed keys)."""
    if hasattr(layer, "update_recurrent_state") or hasattr(layer, "update_conv_state"):
        return "running state"
    name = type(layer).__name__
    return "appending" if name in _APPENDING_LAYERS else "static" if name in _STATIC_LAYERS else "other"


def _refusal(cache: Any, layer: int) -> str:
    current = cache.layers[layer]
    if layer_kind(current) == "running state":
        return (
            f"the routed block's layer {layer} of the cache is a {type(current).__name__}: linear attention keeps "
            "a running state, not one entry per position, so causal routing can't skip tokens in it; leave the "
            "linear-attention blocks out of the routed layers (layers=[...]) to use generate(), or generate inside "
            "modify.routing_disabled"
        )
    return (
        f"the routed block's layer {layer} of the cache is a {type(current).__name__}, which causal routing isn't "
        "tested with (routed layers keep one entry per position, appended or static); use the default dynamic "
        "cache or cache_implementation='static', or generate inside modify.routing_disabled"
    )


def _cropped(h: History, length: int) -> History:
    """``h`` after transformers cut its layer of the cache to ``length`` positions (``crop``: assisted generation
    and prompt lookup drop the rejected candidates), so that the next call's mask sees the positions it keeps.

    Padding is only ever on the left of a generated sequence, so the dropped positions are the last real ones.
    """
    dropped = h.valid.shape[1] - length
    return History(h.valid[:, :length].clone(), (h.real - dropped).clamp(min=0))


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


class KVCacheFollower:
    """The :class:`modify.routing.ragged.CacheFollower` for transformers' caches."""

    def cached(self, cache: Any, layer: int) -> int:
        if layer >= len(cache.layers) or layer_kind(cache.layers[layer]) == "running state":
            return 0  # no length: the layer's running state has no entry per position
        return int(cache.get_seq_length(layer))

    def key_count(self, cache: Any, layer: int, total: int) -> int:
        current = cache.layers[layer] if layer < len(cache.layers) else None
        return current.max_cache_len if layer_kind(current) == "static" else total

    def topk_filled(self, cache: Any, layer: int) -> None:
        cache.__dict__.setdefault(HISTORY_ATTR, {})[layer] = _TOPK_FILLED

    def hold(self, cache: Any, layer: int, x: torch.Tensor) -> None:
        """Keep count of the positions of ``x`` [B, T, D] in a removed block's layer of the cache (capacity 0).

        The block's attention never runs, but transformers reads every step's positions and mask sizes off the
        first attention layer of the cache (``get_seq_length()``, ``get_mask_sizes``), which may be this one. So
        the layer gets one [B, 1, T, 1] zero entry per call: the length is right, no key is ever attended to
        (nothing reads them), and it costs B·T numbers instead of the B·H·T·d of real keys and values. A layer
        of another kind (static, quantized: fixed shapes) is refused; a linear-attention layer keeps no length
        and is left alone.
        """
        if layer < len(cache.layers):
            current = cache.layers[layer]
            kind = type(current).__name__
            if not isinstance(current, CacheLayerMixin):
                return
            if kind not in _APPENDING_LAYERS:
                raise ValueError(
                    f"a {kind} cache can't hold a removed block (capacity 0), whose layer only counts positions; "
                    "use the default dynamic cache (drop cache_implementation), or export the plan with "
                    "'modify export'"
                )
        marker = x.new_zeros(x.shape[0], 1, x.shape[1], 1)
        cache.update(marker, marker, layer)

    def history(self, cache: Any, layer: int, batch: int, device: torch.device) -> History:
        if layer < len(cache.layers) and layer_kind(cache.layers[layer]) == "running state":
            raise UnsupportedModelError("", _refusal(cache, layer))
        if layer < len(cache.layers) and layer_kind(cache.layers[layer]) not in ("appending", "static"):
            raise ValueError(_refusal(cache, layer))
        store: dict[int, Any] = cache.__dict__.setdefault(HISTORY_ATTR, {})
        length = self.cached(cache, layer)
        h = store.get(layer)
        if h is _TOPK_FILLED and length > 0:
            raise ValueError(
                "this cache was filled by a top-k forward, which keeps only the routed tokens' keys, so it can't "
                "be continued; call modify.set_routing(model, 'causal') before the first forward, or use generate()"
            )
        if isinstance(h, History) and 0 < length < h.valid.shape[1]:
            h = _cropped(h, length)
            store[layer] = h
        if not isinstance(h, History) or length == 0:
            # A fresh cache, or one a dense call filled (routing disabled): every cached position is real.
            h = History(
                torch.ones(batch, length, dtype=torch.bool, device=device),
                torch.full((batch,), length, dtype=torch.int64, device=device),
            )
            store[layer] = h
        if h.valid.shape[0] != batch:
            raise ValueError(
                f"the cache holds {h.valid.shape[0]} sequences but the call has {batch}; causal routing follows "
                "each sequence's cache, so beam search and batch changes mid-generation are not supported (use "
                "greedy or sampling)"
            )
        return h

    def stand_in(self, cache: Any, layer: int, idx: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor | None,
                 batch: int, length: int) -> Any:  # fmt: skip
        return _SelectedCache(cache, layer, idx, valid, rows, batch, length)

    def fill_skipped(self, cache: Any, layer: int, length: int) -> None:
        """Write ``length`` hidden zero positions into the block's layer of the cache (nobody processed them)."""
        keys, values = cache.layers[layer].keys, cache.layers[layer].values
        zk = keys.new_zeros(keys.shape[0], keys.shape[1], length, keys.shape[3])
        zv = values.new_zeros(values.shape[0], values.shape[1], length, values.shape[3])
        cache.update(zk, zv, layer)
