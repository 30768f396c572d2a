"""The routed forward that replaces a converted block's forward.

Per sequence it scores every token, keeps the k = ceil(c·T) best in positional order, gathers them and
every per-token argument of the call (rotary tables, position ids, the 4-D mask on both token axes),
runs the block's Δ graph on those k tokens only, and adds ``g(r)·Δ`` back into the residual stream, part
by part in the block's own order of additions (see :mod:`modify.passes.extract_delta`).
Skipped tokens leave the block unchanged and cost nothing inside it, unless the block has a skip path
(:mod:`modify.skip_path`): then they get its cheap estimate of Δ instead. Shapes depend only on B, T and c.

A block at capacity 0 is removed: every call returns the hidden states as they came (plus the skip path's
estimate for every token, where it has one), without running its router or any part of the block; with a
cache, its layer only keeps count of the positions (:func:`modify.generate.selective.hold_positions`).

That is top-k routing, the training rule. Calls where each token decides alone (causal routing, as when
sampling) and calls inside ``generate()`` or that continue a cache take the per-token path of
:mod:`modify.generate.selective` instead.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from modify.generate.causal import causal_process, observe_topk
from modify.generate.selective import (
    cached_length,
    find_cache,
    history_of,
    hold_positions,
    mark_topk_filled,
    selective_forward,
)
from modify.kernels import gather_token_dim
from modify.kernels.ops import route_gather, route_scatter_add
from modify.passes.capture_block import CallStructure, call_structure, capture_block
from modify.passes.extract_delta import ExtractDeltaPass
from modify.passes.probe_block_calls import BlockCallSpec, Path, bind_call
from modify.placement import Wrapped, unwrap_forward, wrap_forward
from modify.router import PREDICTOR_ATTR, ROUTER_ATTR
from modify.skip_path import SKIP_ATTR

__all__ = [
    "RoutingState",
    "STATE_ATTR",
    "capacity_tokens",
    "select_tokens",
    "skipped_tokens",
    "padding_from_mask",
    "block_padding",
    "recent_padding",
    "install",
    "uninstall",
]

#: Attribute of a routed block holding its :class:`RoutingState` (a plain object: not in the state dict).
STATE_ATTR = "_modify_routing"


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


def padding_from_mask(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, T] bool, True where a token is padding, read from a [B|1, H|1, T, T + P] attention mask.

    A real token always attends to itself; Hugging Face masks a padding key in every row, its own
    included. So the diagonal tells padding apart whatever causal, sliding-window or chunked pattern the
    mask also carries. With P cached positions before the T tokens, their own keys are the last T columns.
    """
    diag = mask.diagonal(offset=mask.shape[-1] - mask.shape[-2], dim1=-2, dim2=-1)[:, 0]
    return (~mask_allows(diag)).expand(batch, diag.shape[-1])


def block_padding(
    named: dict[str, Any], spec: BlockCallSpec, mask: torch.Tensor | None, batch: int, length: int
) -> torch.Tensor | None:
    """[B, T] bool, True at padding, for a block call: from its 4-D attention mask ``mask`` if it has one,
    else from the padding mask the probe found (hybrid models pass their linear-attention and state-space
    layers only that), else None."""
    if mask is not None:
        return padding_from_mask(~mask if spec.mask_blocks_true else mask, batch)
    if spec.padding_mask is None:
        return None
    leaf: Any = named.get(spec.padding_mask[0])
    for i in spec.padding_mask[1:]:
        leaf = leaf[i] if leaf is not None else None
    if not torch.is_tensor(leaf) or leaf.dim() < 2:
        return None
    rows = leaf.reshape(leaf.shape[0], -1)[:, -length:]  # [B, T]; with a cache, the last T of P + T keys
    pad = rows.bool() if spec.padding_value == "true" else rows < 0 if spec.padding_value == "negative" else rows == 0
    return pad.expand(batch, length)


def recent_padding(padding: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """[B, T] of a [B|1, P + T] padding mask (the model's ``attention_mask`` with P cached positions), or None."""
    if padding is None or padding.shape[-1] < length:
        return None
    return padding[:, -length:].expand(batch, length)


def mask_allows(mask: torch.Tensor) -> torch.Tensor:
    """A Hugging Face attention mask as bool, True where attention is allowed: a bool mask as it is, an
    additive one where it is above half its dtype's minimum (what it adds to the scores there is 0)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def pairwise_mask(named: dict[str, Any], spec: BlockCallSpec) -> torch.Tensor | None:
    """The 4-D attention mask of a block call (the argument the probe found indexed by token pairs), or None."""
    if spec.pairwise is None:
        return None
    mask: Any = named.get(spec.pairwise[0])
    for i in spec.pairwise[1:]:
        mask = mask[i] if mask is not None else None
    return mask if torch.is_tensor(mask) and mask.dim() == 4 else None


def _gather_leaf(leaf: Any, path: Path, dims: tuple[int, ...] | None, idx: torch.Tensor, length: int) -> Any:
    if not torch.is_tensor(leaf):
        return leaf
    if dims is None:
        # Not seen while probing: gather every non-batch dimension that has the sequence's length.
        dims = tuple(d for d in range(leaf.dim()) if leaf.shape[d] == length and (d > 0 or leaf.dim() == 1))
    if not dims:
        return leaf
    if 0 in dims:
        if idx.shape[0] != 1 and not bool((idx == idx[:1]).all()):
            raise ValueError(
                f"argument {'.'.join(map(str, path))} has tokens but no batch dimension, so it can't follow "
                "per-sequence routing; use batch size 1 or pass it per sequence"
            )
        leaf = leaf.unsqueeze(0)
        dims = tuple(d + 1 for d in dims)
        for d in dims:
            leaf = gather_token_dim(leaf, idx[:1], d)
        return leaf.squeeze(0)
    batch = idx.shape[0]
    if leaf.shape[0] != batch and leaf.shape[0] % batch == 0:
        # The batch folded with heads, [B·H, ...] (BLOOM's ALiBi bias): gather per sequence, fold back.
        folded = leaf.reshape(batch, leaf.shape[0] // batch, *leaf.shape[1:])
        for d in dims:
            folded = gather_token_dim(folded, idx, d + 1)
        return folded.reshape(-1, *folded.shape[2:])
    for d in dims:
        leaf = gather_token_dim(leaf, idx, d)
    return leaf


def _gather_value(value: Any, path: Path, spec: BlockCallSpec, idx: torch.Tensor, length: int) -> Any:
    if isinstance(value, (tuple, list)):
        items = [_gather_value(v, (*path, i), spec, idx, length) for i, v in enumerate(value)]
        return type(value)(items)
    if type(value) is dict and all(isinstance(k, str) for k in value):
        return {k: _gather_value(v, (*path, k), spec, idx, length) for k, v in value.items()}
    return _gather_leaf(value, path, spec.token_dims.get(path), idx, length)


@dataclass
class RoutingState:
    """What a routed block needs besides its modules.

    Attributes:
        index: position in the block stack.
        name: qualified name of the block.
        capacity: fraction of tokens routed through the block.
        spec: how the parent calls the block (from probing).
        form: block form found by the residual analysis.
        delta: "exact" or "difference" (see :mod:`modify.passes.extract_delta`).
        enabled: False inside ``modify.routing_disabled``: the block runs densely.
        keep_first: leading real tokens always routed (see :func:`select_tokens`).
        skip_path: the spec of the block's skip path ("identity": skipped tokens get nothing).
        input_norm: name of the block's input norm (its first norm on the hidden states), which the skip
            path reads through; "" when the block has none (post-norm blocks).
        observer: called as ``observer(scores, idx, gate)`` (detached) on every top-k call; training uses
            it for per-block selection statistics.
        causal: how a token decides alone when sampling (see :mod:`modify.generate.causal`).
        mode: "auto" (causal inside ``generate()``, else top-k), "topk" or "causal"; see ``modify.set_routing``.
        relaxed: the router phase of training: top-k with a straight-through gradient for every token's score
            (see :func:`_relaxed`); only in training mode. ``relax_temperature`` scales the sigmoid's width.
        cache_layer: index of the block's layer in a Hugging Face cache (its attention's ``layer_idx``).
        generating: True while ``generate()`` runs.
        aux_losses: the causal rule's losses of the current forward, collected by the model's output hook.
        agreement: accumulators of ``modify.measure_agreement`` while it runs, else None.
        router: the block's router, set by :func:`install`; ``threshold`` reads and writes its buffer.
        inline: children traced into when capturing, because they add the residual themselves.
        input_padding: [B, P + T] bool, True at padding, from the ``attention_mask`` the model was called with,
            while it runs; set only for blocks that get no mask of their own (see ``install_model_hooks``).
        handles: hooks on the block's modules that :func:`uninstall` removes.
        device: where the block computes (its accelerate hook's execution device, else its weights' device).
        wrapped: where :func:`install` put the routed forward, for :func:`uninstall`.
        kept: the block's modules (router, skip path, predictor) that were there before conversion (a loaded
            checkpoint's), which undoing a failed conversion leaves in place.
    """

    index: int
    name: str
    capacity: float
    spec: BlockCallSpec
    form: str
    delta: str
    forward_fn: Callable[..., Any]
    signature: inspect.Signature
    enabled: bool = True
    keep_first: int = 0
    skip_path: str = "identity"
    input_norm: str = ""
    observer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
    causal: str = "threshold"
    mode: str = "auto"
    relaxed: bool = False
    relax_temperature: float = 1.0
    cache_layer: int = 0
    generating: bool = False
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    agreement: torch.Tensor | None = None
    graphs: dict[CallStructure, fx.GraphModule] = field(default_factory=dict)
    router: nn.Module | None = None
    inline: tuple[str, ...] = ()
    input_padding: torch.Tensor | None = None
    handles: list[Any] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrapped: Wrapped | None = None
    kept: tuple[str, ...] = ()

    @property
    def threshold(self) -> float:
        """The block's decision threshold for the "threshold" rule (its router's ``threshold`` buffer); NaN
        until fitted, trained or set from the first text it decides on (see :mod:`modify.generate.causal`)."""
        assert self.router is not None, "the block is not routed"
        return float(self.router.threshold)

    @threshold.setter
    def threshold(self, value: float) -> None:
        assert self.router is not None, "the block is not routed"
        self.router.threshold.fill_(value)

    def topk(self, scores: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """[B, k] the top-k rule's tokens of each row (see :func:`select_tokens`), k from the block's capacity."""
        return select_tokens(scores, capacity_tokens(self.capacity, scores.shape[-1]), padding, self.keep_first)

    def skip_input(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What the block's skip path reads: ``x`` after the block's input norm, if it has one."""
        return block.get_submodule(self.input_norm)(x) if self.input_norm else x

    def prepare(self, block: nn.Module) -> None:
        """Capture the Δ graphs of the calls the probe saw, in training and evaluation, before the first call.

        Why: a capture runs Python's ``compile`` and fx tracing, which ``torch.compile`` can't trace; captured
        lazily inside a compiled model it would break the graph in every routed block.
        """
        for structure in self.spec.structures or (self.spec.structure,):
            if structure is not None:
                for training in (False, True):
                    self.graph(block, dataclasses.replace(structure, training=training))

    def graph(self, block: nn.Module, structure: CallStructure) -> fx.GraphModule:
        """The Δ graph for calls of this structure (captured now if :meth:`prepare` didn't)."""
        gm = self.graphs.get(structure)
        if gm is None:
            gm = capture_block(block, structure, self.forward_fn, self.name, self.inline, self.spec.child_nones)
            ExtractDeltaPass(self.spec.hidden, self.name)(gm)
            self.graphs[structure] = gm
        return gm


def routed_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: RoutingState = getattr(block, STATE_ATTR)
    if not state.enabled:
        return state.forward_fn(block, *args, **kwargs)
    named = bind_call(state.signature, block, args, kwargs)
    if state.capacity == 0.0:
        return _removed(block, state, named)
    spec = state.spec
    x = named[spec.hidden]
    batch, length, _ = x.shape
    router = getattr(block, ROUTER_ATTR)
    scores = router(x)
    mask = pairwise_mask(named, spec)
    padding = block_padding(named, spec, mask, batch, length)
    if padding is None:
        padding = recent_padding(state.input_padding, batch, length)
    causal = state.mode == "causal" or (state.mode == "auto" and state.generating)
    cache_arg = find_cache(named)
    if causal or (cache_arg is not None and (state.generating or cached_length(cache_arg[1], state.cache_layer) > 0)):
        return _per_token(block, state, named, x, scores, mask, padding, cache_arg, causal)
    idx = state.topk(scores, padding)
    observe_topk(state, block, x, scores, idx, padding)
    if state.relaxed and block.training and idx.shape[1] < length:
        return _relaxed(block, state, x, scores, idx, args, kwargs)
    if cache_arg is not None:
        mark_topk_filled(cache_arg[1], state.cache_layer)
    gathered = {
        key: route_gather(value, idx) if key == spec.hidden else _gather_value(value, (key,), spec, idx, length)
        for key, value in named.items()
    }
    structure, leaves = call_structure(gathered, block.training)
    out = state.graph(block, structure)(*leaves)
    parts = out[0] if spec.output_is_tuple else out
    gate = router.gate(torch.gather(scores, 1, idx))
    if state.observer is not None:
        state.observer(scores.detach(), idx, gate.detach())
    y = x
    for i, part in enumerate(parts):  # in the dense block's order of additions: bit-exact at gate 1
        # Under autocast Δ comes out in the compute dtype while the stream keeps its own; x + Δ promotes.
        dtype = torch.promote_types(y.dtype, part.dtype)
        if i == 0 or y.dtype != dtype:
            y = route_scatter_add(y.to(dtype), idx, part.to(dtype), gate)
        else:
            # y is already this call's own copy of the stream (nothing saved it for backward): add the later
            # parts in place, the same float operations without a second full-size copy per block.
            scaled = part.to(dtype) * gate.unsqueeze(-1).to(dtype)
            y = y.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, y.shape[-1]), scaled)
    skip = getattr(block, SKIP_ATTR, None)
    if skip is not None and idx.shape[1] < length:
        rest = skipped_tokens(idx, length)
        xs = route_gather(x, rest)
        estimate = skip(state.skip_input(block, xs))
        # Disjoint from the routed tokens, so the order of the additions doesn't matter; no gate: the
        # router's score says nothing about how well the path estimates a token it rated low.
        y = route_scatter_add(y, rest, estimate.to(y.dtype), torch.ones(rest.shape, dtype=gate.dtype, device=y.device))
    return (y, *out[1:]) if spec.output_is_tuple else y


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
    if state.observer is not None:
        state.observer(scores.detach(), idx, torch.gather(gate, 1, idx).detach())
    y = x + (mask * gate).unsqueeze(-1).to(delta.dtype) * delta
    skip = getattr(block, SKIP_ATTR, None)
    if skip is not None:
        y = y + ((1.0 - hard).unsqueeze(-1) * skip(state.skip_input(block, x))).to(y.dtype)
    return (y, *out[1:]) if state.spec.output_is_tuple else y


def _removed(block: nn.Module, state: RoutingState, named: dict[str, Any]) -> Any:
    """A block at capacity 0: no token runs it (nor its router); a skip path gives every token its estimate.

    Why the cache is touched at all: transformers reads positions and mask sizes off the first cache layer
    (``get_seq_length()``), so a removed first block must still keep count of the positions it was passed.
    """
    spec = state.spec
    x = named[spec.hidden]
    cache_arg = find_cache(named)
    if cache_arg is not None:
        hold_positions(cache_arg[1], state.cache_layer, x)
    y = x
    skip = getattr(block, SKIP_ATTR, None)
    if skip is not None:
        y = x + skip(state.skip_input(block, x)).to(x.dtype)
    # As the per-token path returns when no token ran: the block's other outputs (attention weights) are None.
    return (y, None) if spec.output_is_tuple else y


def _per_token(
    block: nn.Module, state: RoutingState, named: dict[str, Any], x: torch.Tensor, scores: torch.Tensor,
    mask: torch.Tensor | None, padding: torch.Tensor | None, cache_arg: tuple[str, Any] | None, causal: bool,
) -> Any:  # fmt: skip
    """A call whose tokens decide one by one (causal routing), or that extends a cache; see
    :mod:`modify.generate.selective`. Top-k with a cache picks the best of this call's tokens."""
    batch, length, _ = x.shape
    history = history_of(cache_arg[1], state.cache_layer, batch, x.device) if cache_arg is not None else None
    real = ~padding if padding is not None else torch.ones(batch, length, dtype=torch.bool, device=x.device)
    if causal:
        seen = history.real if history is not None else torch.zeros(batch, dtype=torch.int64, device=x.device)
        process = causal_process(state, block, x, scores, real, seen)
    else:
        idx = state.topk(scores, padding)
        process = torch.zeros_like(real).scatter_(1, idx, True) & real
    return selective_forward(block, state, named, x, scores, process, mask, padding, cache_arg, history)


def install(
    block: nn.Module, state: RoutingState, router: nn.Module, skip: nn.Module | None = None,
    predictor: nn.Module | None = None,
) -> None:  # fmt: skip
    """Route ``block``: add its router (skip path, predictor) and put the routed forward in place of the block's
    own, under any hook accelerate has on it (see :mod:`modify.placement`). ``state`` is prepared
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
