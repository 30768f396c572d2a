"""The implementations a converted model is benchmarked against, swapped into its routed blocks.

Each routes exactly as the converted block does (same router, same top-k, same gate), so that the outputs
agree and only the way the block computes differs:

- ``masked``: the block runs on every token and its update is multiplied by the selection mask,
  ``y = x + m·g(r)·(block(x) - x)``. Common in Mixture-of-Depths code; it saves nothing by construction.
- ``per-sample``: a Python loop over the batch; each row's chosen tokens are taken with boolean indexing
  (a host sync per row), the block's own forward runs on them with its per-token arguments sliced alike,
  and the result is written back by index. The other common shape of MoD code.

``implementation(model, name)`` runs the model with one of them, or ``"dense"`` (routing disabled) or
``"converted"`` (the routed forward, :mod:`modify.routing`).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from modify.api import routed_blocks, routing_disabled
from modify.passes.probe_block_calls import BlockCallSpec, Path, bind_call
from modify.routing import STATE_ATTR, RoutingState, block_padding, pairwise_mask
from modify.routing.router import ROUTER_ATTR

__all__ = ["IMPLEMENTATIONS", "implementation", "masked_forward", "per_sample_forward"]

#: What ``modify bench`` compares, in its column order.
IMPLEMENTATIONS = ("dense", "converted", "masked", "per-sample")


def _route(block: nn.Module, state: RoutingState, named: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(x, [B, T] bool selection, [B, T] gate) as the routed forward computes them."""
    x = named[state.spec.hidden]
    router = getattr(block, ROUTER_ATTR)
    scores = router(x)
    mask = pairwise_mask(named, state.spec)
    padding = block_padding(named, state.spec, mask, x.shape[0], x.shape[1])
    idx = state.topk(scores, padding)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
    return x, keep, router.gate(scores)


def masked_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: RoutingState = getattr(block, STATE_ATTR)
    if not state.enabled:
        return state.forward_fn(block, *args, **kwargs)
    x, keep, gate = _route(block, state, bind_call(state.signature, block, args, kwargs))
    out = state.forward_fn(block, *args, **kwargs)  # every token
    y = out[0] if state.spec.output_is_tuple else out
    y = x + (keep * gate).unsqueeze(-1).to(y.dtype) * (y - x)
    return (y, *out[1:]) if state.spec.output_is_tuple else y


def _row_leaf(leaf: Any, dims: tuple[int, ...] | None, b: int, batch: int, keep: torch.Tensor) -> Any:
    if not torch.is_tensor(leaf):
        return leaf
    if leaf.dim() > 0 and leaf.shape[0] == batch and (dims is None or 0 not in dims):
        leaf = leaf[b : b + 1]
    for d in dims or ():
        leaf = leaf[(slice(None),) * d + (keep,)]
    return leaf


def _row_value(value: Any, path: Path, spec: BlockCallSpec, b: int, batch: int, keep: torch.Tensor) -> Any:
    if isinstance(value, (tuple, list)):
        return type(value)(_row_value(v, (*path, i), spec, b, batch, keep) for i, v in enumerate(value))
    return _row_leaf(value, spec.token_dims.get(path), b, batch, keep)


def per_sample_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: RoutingState = getattr(block, STATE_ATTR)
    if not state.enabled:
        return state.forward_fn(block, *args, **kwargs)
    named = bind_call(state.signature, block, args, kwargs)
    x, keep, gate = _route(block, state, named)
    hidden, batch = state.spec.hidden, x.shape[0]
    rows = []
    for b in range(batch):
        chosen = keep[b]
        call = {k: _row_value(v, (k,), state.spec, b, batch, chosen) for k, v in named.items() if k != hidden}
        xs = x[b, chosen]
        out = state.forward_fn(block, **{hidden: xs.unsqueeze(0)}, **call)
        ys = (out[0] if state.spec.output_is_tuple else out)[0]
        row = x[b].clone()
        row[chosen] = xs + gate[b, chosen].unsqueeze(-1).to(ys.dtype) * (ys - xs)
        rows.append(row)
    y = torch.stack(rows)
    return (y, *out[1:]) if state.spec.output_is_tuple else y


@contextlib.contextmanager
def implementation(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Run the converted ``model``'s routed blocks as ``name`` (one of :data:`IMPLEMENTATIONS`) inside."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {name!r}; choose one of {IMPLEMENTATIONS}")
    if name == "dense":
        with routing_disabled(model):
            yield model
        return
    if name == "converted":
        yield model
        return
    forward = masked_forward if name == "masked" else per_sample_forward
    blocks = [block for block, _ in routed_blocks(model)]
    saved = [block.forward for block in blocks]
    for block in blocks:
        block.forward = types.MethodType(forward, block)  # type: ignore[method-assign]
    try:
        yield model
    finally:
        for block, f in zip(blocks, saved):
            block.forward = f  # type: ignore[method-assign]
