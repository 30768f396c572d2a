"""The routed forward that replaces a converted block's forward: which path a call takes.

Per sequence it scores every token, keeps the k = ceil(c·T) best in positional order (the top-k rule of
:mod:`modify.routing.selection`) and runs the block's Δ graph on those k tokens only, through the routed call
(:mod:`modify.routing.call`), which adds ``g(r)·Δ`` back into the residual stream part by part in the block's
own order of additions. Skipped tokens leave the block unchanged and cost nothing inside it, unless the block
has a skip path (:mod:`modify.routing.skip_path`): then they get its cheap estimate of Δ instead. Shapes depend
only on B, T and c.

The other paths of a call:

- mode "dense" (``modify.routing_disabled``): the block's own forward;
- capacity 0, a removed block: the hidden states as they came (plus the skip path's estimate for every token,
  where it has one), without running its router or any part of the block; with a cache, its layer only keeps
  count of the positions;
- calls where each token decides alone (causal routing, as when sampling) and calls inside ``generate()`` or
  that continue a cache: the per-token path of :mod:`modify.routing.ragged`, and for a decode step (one token
  per row, continuing a cache) its fast path, :mod:`modify.routing.decode`;
- the router phase of training (``relaxed``): Δ for every token and a straight-through gradient for every score.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any

import torch
from torch import nn

from modify.kernels.ops import route_gather, route_scatter_add
from modify.passes.probe_block_calls import bind_call
from modify.routing import rules
from modify.routing.arguments import BlockCall, padding_from_mask
from modify.routing.call import routed_delta
from modify.routing.decode import decode_step, fast_decode
from modify.routing.kv_all import kv_all_delta, kv_all_per_token
from modify.routing.placement import unwrap_forward, wrap_forward
from modify.routing.ragged import cache_follower, ragged_forward
from modify.routing.router import PREDICTOR_ATTR, ROUTER_ATTR
from modify.routing.selection import skipped_tokens
from modify.routing.skip_path import SKIP_ATTR
from modify.routing.state import STATE_ATTR, RoutingState

__all__ = ["routed_forward", "install", "uninstall"]


def _observe(state: RoutingState, scores: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor) -> None:
    for fn in state.hooks.selection:
        fn(scores.detach(), idx, gate.detach())


def routed_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: RoutingState = getattr(block, STATE_ATTR)
    if state.mode == "dense":
        return state.forward_fn(block, *args, **kwargs)
    named = bind_call(state.signature, block, args, kwargs)
    call = BlockCall.bind(named, state.spec, state.hooks.input_padding)
    if state.capacity == 0.0:
        return _removed(block, state, call)
    scores = getattr(block, ROUTER_ATTR)(call.x)
    causal = state.mode == "causal" or (state.mode == "auto" and state.generating)
    cache = call.cache[1] if call.cache is not None else None
    if causal or (cache is not None and (state.generating or cache_follower().cached(cache, state.cache_layer) > 0)):
        return _per_token(block, state, call, scores, causal)
    idx = state.topk(scores, call.padding)
    rules.learn_from_topk(state, block, call.x, scores, idx, call.padding)
    for fn in state.hooks.topk:
        fn(block, call.x, scores, idx, call.padding)
    if state.relaxed and block.training and idx.shape[1] < call.x.shape[1]:
        return _relaxed(block, state, call.x, scores, idx, args, kwargs)
    if cache is not None and state.kv != "all":
        cache_follower().topk_filled(cache, state.cache_layer)
    gate = getattr(block, ROUTER_ATTR).gate(torch.gather(scores, 1, idx))
    _observe(state, scores, idx, gate)
    if state.kv == "all":
        y, rest = kv_all_delta(block, state, named, idx, gate)
    else:
        y, rest = routed_delta(block, state, named, idx, gate)
    y = _add_skip_estimate(block, state, call.x, y, idx, gate.dtype)
    return (y, *rest) if state.spec.output_is_tuple else y


def _add_skip_estimate(
    block: nn.Module, state: RoutingState, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``y`` plus the skip path's estimate of Δ at the tokens ``idx`` leaves out (if the block has a skip path)."""
    skip = getattr(block, SKIP_ATTR, None)
    length = x.shape[1]
    if skip is None or idx.shape[1] == length:
        return y
    rest = skipped_tokens(idx, length)
    estimate = skip(state.skip_input(block, route_gather(x, rest)))
    # Disjoint from the routed tokens, so the order of the additions doesn't matter; no gate: the router's
    # score says nothing about how well the path estimates a token it rated low.
    return route_scatter_add(y, rest, estimate.to(y.dtype), torch.ones(rest.shape, dtype=dtype, device=y.device))


def _relaxed(
    block: nn.Module, state: RoutingState, x: torch.Tensor, scores: torch.Tensor, idx: torch.Tensor,
    args: tuple[Any, ...], kwargs: dict[str, Any],
) -> Any:  # fmt: skip
    """The router phase of training (``modify train --router-phase``): Δ for every token, a hard top-k mask in
    the forward and a sigmoid's gradient around the k-th score in the backward (straight-through).

    Why: in the top-k forward a skipped token sends its router no signal at all, so a router can learn only
    to rank the tokens it already picks. Here every token's score gets ∂L/∂score through
    σ((r − θ) / t), θ midway between the k-th and (k+1)-th scores of its row and t their rows' score spread,
    at the cost of a dense forward. The mask is the top-k rule's exactly, so the loss is the routed model's
    but for the attention, which sees every token (the dense block's Δ).
    """
    out = state.forward_fn(block, *args, **kwargs)
    dense = out[0] if state.spec.output_is_tuple else out
    delta = dense - x
    router = getattr(block, ROUTER_ATTR)
    k = idx.shape[1]
    top = scores.detach().topk(k + 1, dim=-1).values
    theta = 0.5 * (top[:, k - 1] + top[:, k]).unsqueeze(-1)
    spread = scores.detach().std(dim=-1, keepdim=True).clamp_min(1e-6) * state.relax_temperature
    soft = torch.sigmoid((scores - theta) / spread)
    hard = torch.zeros_like(soft).scatter_(1, idx, 1.0)
    mask = hard + soft - soft.detach()
    gate = router.gate(scores)
    _observe(state, scores, idx, torch.gather(gate, 1, idx))
    y = x + (mask * gate).unsqueeze(-1).to(delta.dtype) * delta
    skip = getattr(block, SKIP_ATTR, None)
    if skip is not None:
        y = y + ((1.0 - hard).unsqueeze(-1) * skip(state.skip_input(block, x))).to(y.dtype)
    return (y, *out[1:]) if state.spec.output_is_tuple else y


def _removed(block: nn.Module, state: RoutingState, call: BlockCall) -> Any:
    """A block at capacity 0: no token runs it (nor its router); a skip path gives every token its estimate.

    Why the cache is touched at all: transformers reads positions and mask sizes off the first cache layer
    (``get_seq_length()``), so a removed first block must still keep count of the positions it was passed.
    """
    x = call.x
    if call.cache is not None:
        cache_follower().hold(call.cache[1], state.cache_layer, x)
    y = x
    skip = getattr(block, SKIP_ATTR, None)
    if skip is not None:
        y = x + skip(state.skip_input(block, x)).to(x.dtype)
    # As the per-token path returns when no token ran: the block's other outputs (attention weights) are None.
    return (y, None) if state.spec.output_is_tuple else y


@torch.compiler.disable
def _per_token(block: nn.Module, state: RoutingState, call: BlockCall, scores: torch.Tensor, causal: bool) -> Any:
    """A call whose tokens decide one by one (causal routing), or that extends a cache; see
    :mod:`modify.routing.ragged`. Top-k with a cache picks the best of this call's tokens.

    Runs eagerly under ``torch.compile`` (the compiled model around it breaks its graph here): its work depends on
    the decision it reads, and traced, its graph breaks at that read in every routed block, whose resumed frames
    share code but not blocks, so they recompile per block past dynamo's limit and then run with failing guards.
    """
    x = call.x
    batch = x.shape[0]
    history = None
    follower = cache_follower() if call.cache is not None else None
    if state.kv == "all":
        past = follower.cached(call.cache[1], state.cache_layer) if follower is not None else 0
        call = _cache_padding(state, call, past)
        process = _process(state, block, call, scores, causal, past)
        if fast_decode(call, None, state.kv):
            return decode_step(block, state, call, scores, process, None)
        return kv_all_per_token(block, state, call, scores, process, past)
    if follower is not None:
        history = follower.history(call.cache[1], state.cache_layer, batch, x.device)
        call = _cache_padding(state, call, history.valid.shape[1])
    real = call.real()
    if causal:
        seen = history.real if history is not None else torch.zeros(batch, dtype=torch.int64, device=x.device)
        process = rules.causal_process(state, block, x, scores, real, seen)
    else:
        idx = state.topk(scores, call.padding)
        process = torch.zeros_like(real).scatter_(1, idx, True) & real
    if fast_decode(call, history, state.kv):
        return decode_step(block, state, call, scores, process, history)
    return ragged_forward(block, state, call, scores, process, history)


def _cache_padding(state: RoutingState, call: BlockCall, past: int) -> BlockCall:
    """``call`` with its padding read from the right mask columns when the cache has a fixed length (static): the
    mask is wider than what the cache holds, and this call's keys are columns past..past + T, not the last T (a
    sliding window's mask is narrower than the cache, and its last T columns are this call's, as read)."""
    if call.mask is None or call.mask.shape[-1] <= past + call.x.shape[1]:
        return call
    mask = ~call.mask if state.spec.mask_blocks_true else call.mask
    return dataclasses.replace(call, padding=padding_from_mask(mask, call.x.shape[0], past))


def _process(
    state: RoutingState, block: nn.Module, call: BlockCall, scores: torch.Tensor, causal: bool, past: int
) -> torch.Tensor:
    """[B, q] the tokens a ``kv="all"`` block processes in a per-token call, ``past`` positions in its cache layer.
    That layer is the dense model's, so the real tokens seen before are those positions less the padding."""
    length = call.x.shape[1]
    real = call.real()
    if not causal:
        return torch.zeros_like(real).scatter_(1, state.topk(scores, call.padding), True) & real
    seen = torch.full((call.x.shape[0],), past, dtype=torch.int64, device=call.x.device)
    padding = state.hooks.input_padding
    if padding is not None and past > 0 and padding.shape[-1] >= past + length:
        seen = seen - padding[:, -(past + length) : -length].sum(-1).to(seen.device).expand_as(seen)
    return rules.causal_process(state, block, call.x, scores, real, seen)


def install(
    block: nn.Module, state: RoutingState, router: nn.Module, skip: nn.Module | None = None,
    predictor: nn.Module | None = None,
) -> None:  # fmt: skip
    """Route ``block``: add its router (skip path, predictor) and put the routed forward in place of the block's
    own, under any hook accelerate has on it (see :mod:`modify.routing.placement`). ``state`` is prepared
    (:meth:`RoutingState.prepare`): convert captures every block before it changes any."""
    for attr, module in ((ROUTER_ATTR, router), (SKIP_ATTR, skip), (PREDICTOR_ATTR, predictor)):
        if module is not None and getattr(block, attr, None) is not module:
            block.add_module(attr, module)
    if router.threshold.is_meta or "threshold" in router._non_persistent_buffers_set:
        # A checkpoint that held no threshold (older, or offloaded): NaN, the plan's value follows; persistent
        # from now on, so the next save keeps it.
        value = torch.full((), math.nan) if router.threshold.is_meta else router.threshold.detach()
        router.register_buffer("threshold", value.to(device=state.device, dtype=torch.float32))
    state.router = router
    setattr(block, STATE_ATTR, state)
    state.wrapped = wrap_forward(block, types.MethodType(routed_forward, block))


def uninstall(block: nn.Module, keep: tuple[str, ...] = ()) -> None:
    """Undo :func:`install`; the block's own parameters were never touched, and its hooks are as they were.
    The modules named in ``keep`` (of ROUTER_ATTR, SKIP_ATTR, PREDICTOR_ATTR) stay."""
    state = getattr(block, STATE_ATTR)
    if state.wrapped is not None:
        unwrap_forward(block, routed_forward, state.wrapped)
    for handle in state.handles:
        handle.remove()
    for attr in (ROUTER_ATTR, SKIP_ATTR, PREDICTOR_ATTR):
        if attr in block._modules and attr not in keep:
            delattr(block, attr)
    delattr(block, STATE_ATTR)
