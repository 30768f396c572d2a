"""Forward FLOPs of a model, dense and as converted, counted from what each block runs.

Counted as ``torch.utils.flop_counter`` counts (matrix products, convolutions, attention kernels; a
multiply-add is 2 FLOPs), plus what it can't see (:data:`EXTRA_FORMULAS`): grouped expert matmuls (the
active experts' rows times the expert's size) and CPU scaled-dot-product attention (the full Tq×Tk square, as
eager attention computes it).

Nothing is read from class names or config fields. The model is run densely on random token ids of batch 1
at four lengths under a FLOP counter, with hooks attributing the count to each block and the rest to the
outside (embeddings, final norm, LM head). Each part's cost is fitted as a·T + b·T² (per-token and
per-token-pair terms) from two lengths and checked at the other two; a part that isn't such a polynomial (a
linear-attention block that pads to its chunk size, say) is measured at each length asked for instead. The
probes are cached per model until its parameters change.

A routed block runs the block on k = ceil(c·T) tokens per sequence, its router on all T, its skip path (if
any, :mod:`modify.routing.skip_path`) on the other T - k, and its causal predictor (if any) on all T; a removed block
(capacity 0) runs none of them but its skip path, on all T. A block whose
Mixture-of-Experts layer has a no-op expert (:mod:`modify.moe.noop`) runs that layer, probed as a part of its
own, on k tokens, and the layer's router and no-op row on all T.

A ``kv="all"`` block (:mod:`modify.routing.kv_all`) runs its key/value side (the input norm, the key and value
projections with their norms and biases, the key's rotary encoding) on all T tokens and its query side (the input
norm again, the query projection, attention, the output projection, the MLP) on k queries over T keys. Both sides
are probed as they run: the block's own split graphs on the probe's calls, the key/value side fitted as a·T + b·T²
and the query side as a·q + b·q·T from q = T and q = T/2 queries (attention's cost is queries × keys, so causal
attention counts the whole k×T rectangle, as the dense block counts the whole T×T square). A fused projection (GPT-2's
``c_attn``) feeds both sides and so runs on T + k tokens, as it does.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from modify.api import routing_disabled
from modify.archs import MOE_PARTS
from modify.moe.noop import NOOP_STATE_ATTR, find_moe
from modify.passes.capture_block import call_structure
from modify.passes.find_block_stack import find_block_stack
from modify.passes.probe_block_calls import bind_call, random_token_ids
from modify.routing import STATE_ATTR, capacity_tokens
from modify.routing.kv_all import KV_OPTIONS, kv_all_delta
from modify.routing.router import PREDICTOR_ATTR, ROUTER_ATTR
from modify.routing.skip_path import skip_path_flops

__all__ = [
    "FlopCount",
    "flops",
    "block_flops",
    "routed_block_flops",
    "flop_counter",
    "EXTRA_FORMULAS",
    "FIT_LENGTHS",
]

#: Probe lengths: the cost polynomial is fitted on the first two and checked on the others.
FIT_LENGTHS = (8, 16, 12, 24)


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs: ``dense`` for the original model, ``routed`` for the model as converted.

    ``blocks`` holds ``(dense, routed)`` for each block of the stack, in order.
    """

    dense: int
    routed: int
    blocks: tuple[tuple[int, int], ...] = ()

    @property
    def ratio(self) -> float:
        return self.routed / self.dense


def _grouped_mm_flops(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``_grouped_mm``: groups of rows of ``a`` times one expert matrix each, so 2·rows·K·N in all."""
    if len(a_shape) == 2 and len(b_shape) == 2:  # groups split K: every group sees all M rows and N columns
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    numel = 1
    for s in out_shape:
        numel *= s
    return 2 * numel * a_shape[-1]


def _sdpa_cpu_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _shapes(formula: Callable[..., int]) -> Callable[..., int]:
    def wrapped(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        shapes = [a.shape if torch.is_tensor(a) else a for a in args]
        return formula(*shapes, out_shape=out_shape)

    return wrapped


#: Ops torch's FLOP counter does not count, with their formulas.
EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {}
if hasattr(torch.ops.aten, "_grouped_mm"):
    EXTRA_FORMULAS[torch.ops.aten._grouped_mm] = _shapes(_grouped_mm_flops)
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _shapes(_sdpa_cpu_flops)


class _Untracked:
    """Stands in for FlopCounterMode's module tracker: every count goes to the total only."""

    parents = ("Global",)

    def __enter__(self) -> _Untracked:
        return self

    def __exit__(self, *args: Any) -> None:
        return None


def flop_counter() -> FlopCounterMode:
    """torch's ``FlopCounterMode`` that also counts :data:`EXTRA_FORMULAS` and keeps totals only.

    Why totals only: its per-module breakdown hooks every module's outputs, and that tracker asserts under
    ``no_grad`` on a module that slices its own parameters (DBRX's experts); per-block counts come from
    :func:`flops`' own hooks instead.
    """
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS)
    counter.mod_tracker = _Untracked()  # type: ignore[assignment]
    return counter


@dataclass
class _Costs:
    """Probed costs of one model: per part (blocks, then the outside), a polynomial or measured values."""

    fits: list[tuple[int, int] | None]
    measured: dict[int, list[int]] = field(default_factory=dict)
    #: ``kv="all"`` blocks: block -> (key/value side's fit, query side's fit), probed the first time asked for
    splits: dict[int, tuple[tuple[int, int] | None, tuple[int, int] | None]] = field(default_factory=dict)
    #: (T, q) -> block -> (key/value side over T tokens, query side of q queries), where a fit failed
    split_measured: dict[tuple[int, int], dict[int, tuple[int, int]]] = field(default_factory=dict)


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[Any, _Costs]] = weakref.WeakKeyDictionary()


def _measure(
    model: nn.Module, stack: nn.ModuleList, length: int, example_inputs: Callable[[int], dict[str, Any]] | None
) -> list[int]:
    """FLOPs of each block and of the outside in one dense forward of one sequence of ``length`` tokens."""
    inputs = _probe_inputs(model, length, example_inputs)
    counter = flop_counter()
    parts = [*stack, *(moe for _, moe in _moe_layers(stack))]
    start = [0] * len(parts)
    costs = [0] * len(parts)
    handles = []
    for i, block in enumerate(parts):

        def pre(mod: nn.Module, args: Any, i: int = i) -> None:
            start[i] = counter.get_total_flops()

        def post(mod: nn.Module, args: Any, out: Any, i: int = i) -> None:
            costs[i] += counter.get_total_flops() - start[i]

        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]

    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with routing_disabled(model), torch.no_grad(), counter:
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    blocks = costs[: len(stack)]
    return [*blocks, counter.get_total_flops() - sum(blocks), *costs[len(stack) :]]


def _probe_inputs(
    model: nn.Module, length: int, example_inputs: Callable[[int], dict[str, Any]] | None
) -> dict[str, Any]:
    if example_inputs is not None:
        return example_inputs(length)
    return {"input_ids": random_token_ids(model, 1, length, torch.Generator().manual_seed(length)), "use_cache": False}


def _measure_splits(
    model: nn.Module, stack: nn.ModuleList, blocks: list[int], length: int, queries: tuple[int, ...],
    example_inputs: Callable[[int], dict[str, Any]] | None,
) -> dict[int, dict[int, tuple[int, int]]]:  # fmt: skip
    """For each ``kv="all"`` block in ``blocks``, on its call in one dense forward of ``length`` tokens: q ->
    (FLOPs of its key/value side over all tokens, of its query side for the first q tokens), for q in ``queries``.

    The query side runs as the routed forward runs it (:func:`modify.routing.kv_all.kv_all_delta`, gate 1), so
    it counts what that runs; the key/value side it also runs is counted alone and taken off.
    """
    found: dict[int, dict[int, tuple[int, int]]] = {}

    def hook(block: nn.Module, args: Any, kwargs: Any, index: int) -> None:
        state = getattr(block, STATE_ATTR)
        named = bind_call(state.signature, block, args, kwargs)
        structure, leaves = call_structure(named, block.training)
        split = state.program.split(block, structure, leaves, state.name)
        x = named[state.spec.hidden]
        with flop_counter() as counter:
            split.kv(*leaves)
        kv = counter.get_total_flops()
        found[index] = {}
        for q in queries:
            idx = torch.arange(q, device=x.device).expand(x.shape[0], q)
            gate = torch.ones(idx.shape, dtype=x.dtype, device=x.device)
            with flop_counter() as counter:
                kv_all_delta(block, state, named, idx, gate)
            found[index][q] = (kv, counter.get_total_flops() - kv)

    handles = [
        stack[i].register_forward_pre_hook(lambda b, a, k, i=i: hook(b, a, k, i), with_kwargs=True) for i in blocks
    ]
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with routing_disabled(model), torch.no_grad():
            model(**_probe_inputs(model, length, example_inputs))
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    missing = [i for i in blocks if i not in found]
    if missing:
        raise ValueError(f"block {missing[0]} was not called in the probe forward, so its kv='all' cost is unknown")
    return found


def _moe_layers(stack: nn.ModuleList) -> list[tuple[int, nn.Module]]:
    """(block index, Mixture-of-Experts layer) of the blocks that have one, measured as parts of their own."""
    found = [(i, find_moe(block)) for i, block in enumerate(stack)]
    return [(i, f[1]) for i, f in found if f is not None]


def _fit(values: dict[int, int]) -> tuple[int, int] | None:
    """(a, b) with cost = a·T + b·T² through the first two lengths, if the others agree exactly."""
    (t1, f1), (t2, f2) = list(values.items())[:2]
    # Solve a·t + b·t² = f for two lengths; FLOP counts are integers, so a fit that is real is exact.
    det = t1 * t2 * t2 - t2 * t1 * t1
    a_num, b_num = f1 * t2 * t2 - f2 * t1 * t1, t1 * f2 - t2 * f1
    if a_num % det or b_num % det:
        return None
    a, b = a_num // det, b_num // det
    return (a, b) if all(a * t + b * t * t == f for t, f in values.items()) else None


def _signature(model: nn.Module) -> tuple:
    return tuple((n, tuple(p.shape), p.dtype, p.device) for n, p in model.named_parameters())


def _costs(model: nn.Module, stack: nn.ModuleList, example_inputs: Callable[[int], dict[str, Any]] | None) -> _Costs:
    signature = _signature(model)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == signature:
        return cached[1]
    runs = {t: _measure(model, stack, t, example_inputs) for t in FIT_LENGTHS}
    parts = len(stack) + 1 + len(_moe_layers(stack))
    costs = _Costs([_fit({t: runs[t][p] for t in FIT_LENGTHS}) for p in range(parts)], dict(runs))
    _CACHE[model] = (signature, costs)
    return costs


@dataclass
class _Probe:
    """The probed costs of one model, for one count: parts are the blocks, then the outside, then the
    blocks' Mixture-of-Experts layers (``moe_part``: block index -> part)."""

    model: nn.Module
    stack: nn.ModuleList
    example_inputs: Callable[[int], dict[str, Any]] | None
    costs: _Costs
    moe_part: dict[int, int]

    @classmethod
    def of(cls, model: nn.Module, example_inputs: Callable[[int], dict[str, Any]] | None) -> _Probe:
        _, stack = find_block_stack(model)
        moe_part = {i: len(stack) + 1 + j for j, (i, _) in enumerate(_moe_layers(stack))}
        return cls(model, stack, example_inputs, _costs(model, stack, example_inputs), moe_part)

    def cost(self, part: int, tokens: int) -> int:
        """FLOPs of ``part`` over one sequence of ``tokens`` tokens."""
        if tokens <= 0:
            return 0
        fit = self.costs.fits[part]
        if fit is not None:
            return fit[0] * tokens + fit[1] * tokens * tokens
        if tokens not in self.costs.measured:
            self.costs.measured[tokens] = _measure(self.model, self.stack, tokens, self.example_inputs)
        return self.costs.measured[tokens][part]

    def routed(self, index: int, capacity: float, seq_len: int, skip_path: str, kv: str = "routed") -> int:
        hidden = _hidden_size(self.model, self.stack[index])
        k = capacity_tokens(capacity, seq_len)
        skipped = (seq_len - k) * skip_path_flops(skip_path, hidden)
        # A removed block (capacity 0) doesn't run its router either: only its skip path costs anything.
        router = 2 * hidden * seq_len if capacity > 0 else 0
        block = self.kv_all(index, k, seq_len) if kv == "all" and capacity > 0 else self.cost(index, k)
        return block + router + skipped

    def kv_all(self, index: int, k: int, seq_len: int) -> int:
        """FLOPs of ``kv="all"`` block ``index`` over one sequence: its key/value side on all ``seq_len``
        tokens, its query side on ``k`` queries over ``seq_len`` keys."""
        self.fit_splits([index, *self.split_blocks()])  # every split block in the same probe forwards
        kv_fit, query_fit = self.costs.splits[index]
        if kv_fit is not None and query_fit is not None:
            return kv_fit[0] * seq_len + kv_fit[1] * seq_len**2 + query_fit[0] * k + query_fit[1] * k * seq_len
        measured = self.costs.split_measured.setdefault((seq_len, k), {})
        if index not in measured:
            runs = _measure_splits(self.model, self.stack, [index], seq_len, (k,), self.example_inputs)
            measured[index] = runs[index][k]
        return sum(measured[index])

    def split_blocks(self) -> list[int]:
        """The blocks converted with kv="all" (their attention split), whatever kv they run now."""
        states = [getattr(block, STATE_ATTR, None) for block in self.stack]
        return [i for i, s in enumerate(states) if s is not None and s.program.attention is not None]

    def fit_splits(self, indices: list[int]) -> None:
        """Probe the ``kv="all"`` blocks ``indices`` not probed yet, all in the same forwards: (a, b) of the
        key/value side as a·T + b·T², and of the query side as a·q + b·q·T (q queries over T keys)."""
        for index in indices:
            state = getattr(self.stack[index], STATE_ATTR, None)
            if state is None or state.program.attention is None:
                raise ValueError(
                    f"block {index} is not converted with kv='all', so its split is unknown; convert it with kv='all'"
                )
        todo = [i for i in dict.fromkeys(indices) if i not in self.costs.splits]
        if not todo:
            return
        runs = {
            t: _measure_splits(self.model, self.stack, todo, t, (t, t // 2), self.example_inputs) for t in FIT_LENGTHS
        }
        for index in todo:
            kv_fit = _fit({t: runs[t][index][t][0] for t in FIT_LENGTHS})
            query_fit = _fit({t: runs[t][index][t][1] for t in FIT_LENGTHS})
            if query_fit is not None:
                a, b = query_fit
                if any(a * (t // 2) + b * (t // 2) * t != runs[t][index][t // 2][1] for t in FIT_LENGTHS):
                    query_fit = None  # not queries × keys: measured at each (T, k) asked for instead
            self.costs.splits[index] = (kv_fit, query_fit)

    def noop_extra(self, index: int, moe: nn.Module, capacity: float, seq_len: int) -> int:
        """What a no-op expert changes in block ``index``'s cost (:mod:`modify.moe.noop`): the layer runs on
        k = ceil(c·T) tokens, its router and the no-op row on all T (the router's rows aren't computed again)."""
        k = capacity_tokens(capacity, seq_len)
        experts, hidden = getattr(moe, MOE_PARTS[0]).weight.shape
        part = self.moe_part[index]
        router = 2 * hidden * experts
        return self.cost(part, k) - self.cost(part, seq_len) + router * (seq_len - k) + 2 * hidden * seq_len


def block_flops(
    model: nn.Module, index: int, tokens: int, example_inputs: Callable[[int], dict[str, Any]] | None = None
) -> int:
    """FLOPs of block ``index`` of the model's stack over one sequence of ``tokens`` tokens, run densely
    (router, skip path and predictor excluded)."""
    return _Probe.of(model, example_inputs).cost(index, tokens)


def routed_block_flops(
    model: nn.Module,
    index: int,
    capacity: float,
    seq_len: int,
    skip_path: str = "identity",
    example_inputs: Callable[[int], dict[str, Any]] | None = None,
    kv: str = "routed",
) -> int:
    """FLOPs of block ``index`` routed at ``capacity`` over one sequence: the block on k = ceil(c·T) tokens,
    the router on all T and the skip path on the T - k others (the router and path need not exist yet). At
    capacity 0 (removed) only the skip path's, on all T. With ``kv="all"`` the block's key/value side runs on
    all T and its query side on k queries over T keys; the block must have been converted with kv="all"."""
    if kv not in KV_OPTIONS:
        raise ValueError(f"unknown kv option {kv!r}; choose one of {KV_OPTIONS}")
    return _Probe.of(model, example_inputs).routed(index, capacity, seq_len, skip_path, kv)


def _hidden_size(model: nn.Module, block: nn.Module) -> int:
    router = getattr(block, ROUTER_ATTR, None)
    if router is not None:
        return router.weight.shape[-1]
    state = getattr(block, STATE_ATTR, None)
    if state is not None:
        return state.spec.hidden_size
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None)
    if not hidden:
        raise ValueError("the model's hidden size is unknown (no config.hidden_size): convert the model first")
    return hidden


def flops(
    model: nn.Module,
    seq_len: int,
    batch_size: int = 1,
    example_inputs: Callable[[int], dict[str, Any]] | None = None,
) -> FlopCount:
    """Forward FLOPs of ``model`` on ``batch_size`` sequences of ``seq_len`` tokens.

    Args:
        example_inputs: builds the model's keyword inputs for one sequence of length T; by default random
            token ids (the model needs a ``config.vocab_size``).

    Returns:
        ``dense``: the model without routing; ``routed``: the model as converted and as it runs now (equal
        to dense for a model that is not converted, or inside ``modify.routing_disabled``).
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    probe = _Probe.of(model, example_inputs)
    outside = probe.cost(len(probe.stack), seq_len)
    states = [getattr(block, STATE_ATTR, None) for block in probe.stack]
    if any(s is not None and s.enabled and s.kv == "all" and s.capacity for s in states):
        probe.fit_splits(probe.split_blocks())
    per_block = []
    for i, block in enumerate(probe.stack):
        full = probe.cost(i, seq_len)
        moe = find_moe(block)
        noop = getattr(moe[1], NOOP_STATE_ATTR, None) if moe is not None else None
        if noop is not None and noop.enabled:
            per_block.append((full, full + probe.noop_extra(i, moe[1], noop.capacity, seq_len)))
            continue
        state = getattr(block, STATE_ATTR, None)
        if state is None or not state.enabled:  # disabled (``routing_disabled``): the block runs densely
            per_block.append((full, full))
            continue
        routed = probe.routed(i, state.capacity, seq_len, state.skip_path, state.kv)
        predictor = getattr(block, PREDICTOR_ATTR, None)  # the causal predictor reads every token
        if predictor is not None and state.capacity > 0:  # a removed block has no decision to make
            routed += seq_len * sum(2 * m.weight.numel() for m in predictor.modules() if isinstance(m, nn.Linear))
        per_block.append((full, routed))
    dense = outside + sum(d for d, _ in per_block)
    routed = outside + sum(r for _, r in per_block)
    return FlopCount(
        dense * batch_size, routed * batch_size, tuple((d * batch_size, r * batch_size) for d, r in per_block)
    )
