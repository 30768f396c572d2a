"""A routed block whose skipped tokens keep their keys and values (``kv="all"``).

The paper's routed block runs whole on its k tokens, so a token it skips is absent from its attention. A
pretrained model's attention expects every earlier token's key and value, and the methods that beat static
removal when retrofitting keep them (FlexiDepth, SkipGPT). Here the block's Δ graph is split at its attention
call (:mod:`modify.passes.split_attention`):

    x [B, T, D] ──key/value side, every token──▶ K, V [B, h, S, d] (written into the cache), mask [B, 1, T, S]
        │
        └─gather idx [B, k]──▶ query side on k tokens, attending to K, V through mask[:, :, idx]──▶ parts
                                                          ──g·part, scatter-add at idx (the routed call)──▶ y

S is T, or the cache's length after this call. A skipped token costs the input norm and the key and value
projections. With a cache the block's layer is the dense model's: every position holds its real key, so the
cache needs no history beside it, and cropping, static caches and assisted generation treat it as any cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modify.errors import UnsupportedModelError
from modify.kernels import gather_token_dim
from modify.passes.capture_block import call_structure
from modify.routing.arguments import BlockCall, gather_value
from modify.routing.call import routed_call
from modify.routing.router import ROUTER_ATTR
from modify.routing.skip_path import SKIP_ATTR

__all__ = ["KV_OPTIONS", "query_mask", "kv_all_delta", "kv_all_per_token", "check_split"]

#: The per-block choices of what a skipped token leaves in the block's attention: "routed" (nothing: the
#: paper's subsequence attention) or "all" (its keys and values).
KV_OPTIONS = ("routed", "all")


def query_mask(
    mask: torch.Tensor | None, idx: torch.Tensor, keys: int, past: int, length: int, dtype: torch.dtype,
    spare: torch.Tensor | None = None,
) -> torch.Tensor | None:  # fmt: skip
    """The attention mask of the gathered queries ``idx`` [B, k] over all ``keys`` (this call's ``length``
    tokens are keys ``past`` to ``past + length``: the last ones, unless the cache has a fixed length): the
    model's own [B|1, H|1, T, S] mask gathered on the query axis only, so padding, sliding windows and packed
    documents hold as in the dense model. Where the model passed no mask
    (sdpa's causal shortcut) a causal one is made. ``spare`` [B, k] marks slots whose result is dropped: they
    see their own key, so no row of the softmax is empty.
    """
    batch, k = idx.shape
    if mask is None and spare is None and k == length:
        return None  # every query, in order (idx is sorted): the dense call's own shortcut holds
    if mask is None:
        cols = torch.arange(keys, device=idx.device)
        allowed = cols[None, None, :] <= (past + idx)[:, :, None]
        mask = torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]
    else:
        mask = gather_token_dim(mask.expand(batch, *mask.shape[1:]), idx, 2)
    if spare is not None and bool(spare.any()):
        own = torch.arange(mask.shape[-1], device=idx.device)[None, None, :] == (past + idx)[:, :, None]
        own = (own & spare[:, :, None])[:, None]
        mask = mask | own if mask.dtype == torch.bool else mask.masked_fill(own, 0.0)
    return mask


def _placeholders(key: str, value: Any, training: bool) -> list[str]:
    return call_structure({key: value}, training)[0].placeholder_names()


def _run_split(
    block: nn.Module, state: Any, named: dict[str, Any], idx: torch.Tensor, gate: torch.Tensor,
    kv_out: tuple[Any, ...], split: Any, past: int = 0, spare: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[Any, ...]]:  # fmt: skip
    spec = state.spec
    x = named[spec.hidden]
    length = x.shape[1]
    key, value, mask = kv_out
    qmask = query_mask(mask, idx, key.shape[-2], past, length, x.dtype, spare)

    def run(xs: torch.Tensor) -> tuple[Any, tuple[Any, ...]]:
        gathered = {}
        for name, arg in named.items():
            if name == spec.hidden:
                gathered[name] = xs
            elif any(p in split.query_inputs for p in _placeholders(name, arg, block.training)):
                gathered[name] = gather_value(arg, (name,), spec, idx, length)
            else:
                gathered[name] = arg  # the query side doesn't read it (the mask, the cache)
        _, leaves = call_structure(gathered, block.training)
        out = split.query(*leaves, key, value, qmask)
        if spec.output_is_tuple:
            return out[0], tuple(out[1:])
        return out, ()

    return routed_call(x, idx, gate, run)


def _split(block: nn.Module, state: Any, named: dict[str, Any]) -> tuple[Any, list[Any]]:
    structure, leaves = call_structure(named, block.training)
    return state.program.split(block, structure, leaves, state.name), leaves


def kv_all_delta(
    block: nn.Module, state: Any, named: dict[str, Any], idx: torch.Tensor, gate: torch.Tensor
) -> tuple[torch.Tensor, tuple[Any, ...]]:
    """The top-k forward of a ``kv="all"`` block: keys and values of every token, the rest for ``idx`` only."""
    split, leaves = _split(block, state, named)
    return _run_split(block, state, named, idx, gate, split.kv(*leaves), split)


def kv_all_per_token(
    block: nn.Module, state: Any, call: BlockCall, scores: torch.Tensor, process: torch.Tensor, past: int
) -> Any:
    """The per-token forward of a ``kv="all"`` block (causal routing, a call extending a cache): every token
    writes its keys and values; the tokens ``process`` [B, q] selects run the query side, in kmax slots per row
    (spare slots of shorter rows gated 0). ``past``: the positions the block's cache layer held before."""
    spec, x = state.spec, call.x
    split, leaves = _split(block, state, call.named)
    kv_out = split.kv(*leaves)
    counts = process.sum(-1)
    kmax = int(counts.max())  # the one host synchronisation: the slots' count is a shape
    y, rest = x, ()
    if kmax > 0:
        order = torch.argsort((~process).to(torch.int8), dim=-1, stable=True)[:, :kmax]
        valid = torch.arange(kmax, device=x.device) < counts[:, None]
        # Slots in positional order: the valid ones are, and a spare slot's result is dropped anyway.
        gate = getattr(block, ROUTER_ATTR).gate(torch.gather(scores, 1, order)) * valid
        spare = ~valid if kmax > int(counts.min()) else None
        y, rest = _run_split(block, state, call.named, order, gate, kv_out, split, past, spare)
    skip = getattr(block, SKIP_ATTR, None)
    skipped = call.real() & ~process
    if skip is not None and bool(skipped.any()):
        y = y + skip(state.skip_input(block, x)).to(y.dtype) * skipped[..., None].to(y.dtype)
    if spec.output_is_tuple:
        return (y, *rest) if rest else (y, None)
    return y


def check_split(block: nn.Module, state: Any, structure: Any, examples: list[Any]) -> float:
    """Check a split block against its own forward on one probe call (``examples``, the graph inputs of a call
    of ``structure``): the query side of every other token, attending to every token's keys and values, must give
    the block's own output at those tokens. Returns the error relative to the largest hidden state.

    Why: the split is derived from the graph, and an attention whose query and keys share more than the graph
    shows (a latent projection read through a module's state, say) would split into something else, silently.

    Raises:
        UnsupportedModelError: the split doesn't reproduce the block, with the error and the fix.
    """
    named = structure.rebuild(tuple(examples))
    x = named[state.spec.hidden]
    batch, length, _ = x.shape
    idx = torch.arange(1, length, 2, device=x.device).expand(batch, -1)
    with torch.no_grad():
        dense = state.forward_fn(block, **named)
        dense = dense[0] if state.spec.output_is_tuple else dense
        y, _ = kv_all_delta(block, state, named, idx, torch.ones(idx.shape, dtype=x.dtype, device=x.device))
    rows = torch.arange(batch, device=x.device)[:, None]
    error = float((y[rows, idx] - dense[rows, idx]).abs().max() / x.abs().max().clamp_min(1e-12))
    tolerance = 1e-4 if x.dtype == torch.float32 else 2e-2
    if not error <= tolerance:
        raise UnsupportedModelError(
            state.name,
            f"kv='all' splits its attention, but the split gives other outputs than the block on the tokens it "
            f"routes (relative error {error:.1e} on a probe call): its query and keys share more than the traced "
            "graph shows; use kv='routed'",
        )
    return error
