"""The public API: convert a model to Mixture-of-Depths in place, inspect it, and revert it."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from modify.archs import MOE_PARTS, UNROUTABLE_FAMILIES, attention_refusal
from modify.config import CONFIG_KEY, LOAD_MARKER_KEY, MoDConfig, mark_loadable, unmark_loadable
from modify.errors import UnsupportedModelError, UsageError
from modify.model_hooks import install_model_hooks, remove_model_hooks
from modify.moe.noop import (
    NOOP_ATTR,
    NOOP_STATE_ATTR,
    NoOpExpert,
    NoOpState,
    find_moe,
    install_noop,
    leave_out_of_load_balancing,
    noop_layers,
    uninstall_noop,
)
from modify.passes.capture_delta import capture_delta
from modify.passes.find_block_stack import find_block_stack
from modify.passes.probe_block_calls import BlockCallSpec, probe_block_calls
from modify.passes.trace_attention import find_attention
from modify.routing.forward import install, uninstall
from modify.routing.kv_all import check_split
from modify.routing.placement import block_device, keep_resident, register_offloaded
from modify.routing.router import PREDICTOR_ATTR, ROUTER_ATTR, MoDPredictor, MoDRouter
from modify.routing.skip_path import SKIP_ATTR, make_skip_path, spec_name
from modify.routing.state import STATE_ATTR, BlockPlan, BlockProgram, RoutingState, routed_blocks

__all__ = [
    "convert",
    "revert",
    "find_blocks",
    "routing_disabled",
    "BlockInfo",
    "is_converted",
    "routed_blocks",
    "noop_layers",
]

Layers = str | Sequence[int]


@dataclass(frozen=True)
class BlockInfo:
    """One block of the stack, as ``find_blocks`` reports it.

    Attributes:
        index: position in the stack.
        name: qualified module name, e.g. "model.layers.3".
        form: residual form (see :mod:`modify.passes.analyze_residual`).
        delta: "exact" when Δ is taken from the graph, "difference" when it is block(x) - x.
        routed: whether the block is routed.
        capacity: its capacity when routed, else None.
        reason: why the block can't be routed (form "unroutable"), else "".
        skip_path: the skip path's spec when routed (see :mod:`modify.routing.skip_path`), else None.
        kv: what the block's skipped tokens leave in its attention when routed ("routed" or "all"), else None.
    """

    index: int
    name: str
    form: str
    delta: str
    routed: bool
    capacity: float | None
    reason: str = ""
    skip_path: str | None = None
    kv: str | None = None


def resolve_layers(layers: Layers, num_blocks: int) -> list[int]:
    """Block indices for "all", "every-other" (1, 3, 5, ...: the paper's plan) or an explicit list."""
    if isinstance(layers, str):
        if layers == "all":
            return list(range(num_blocks))
        if layers == "every-other":
            return list(range(1, num_blocks, 2))
        raise ValueError(f"unknown layers {layers!r}: use 'all', 'every-other' or a list of block indices")
    indices = list(layers)
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_blocks:
            raise ValueError(f"block index {i!r} is out of range: valid indices are 0..{num_blocks - 1}")
    if not indices:
        raise ValueError("layers is empty: give at least one block index, 'all' or 'every-other'")
    return sorted(set(indices))


def parse_layers(text: str) -> str | list[int]:
    """ "every-other", "all", or indices and inclusive ranges: "1,3,5", "4-20", "0,4-6"."""
    if text in ("every-other", "all"):
        return text
    indices: list[int] = []
    for item in text.split(","):
        item = item.strip()
        try:
            if "-" in item:
                low, high = (int(v) for v in item.split("-", 1))
                if low > high:
                    raise ValueError
                indices.extend(range(low, high + 1))
            else:
                indices.append(int(item))
        except ValueError:
            raise UsageError(
                f"malformed --layers {text!r} at {item!r}; use every-other, all, a list like 1,3,5 or a range like 4-20"
            ) from None
    return indices


def _capacities(capacity: float | Sequence[float], count: int) -> list[float]:
    if isinstance(capacity, (int, float)) and not isinstance(capacity, bool):
        return [float(capacity)] * count
    values = list(capacity)  # type: ignore[arg-type]
    if len(values) != count:
        raise ValueError(f"got {len(values)} capacities for {count} routed blocks; give one value or one per block")
    return [float(v) for v in values]


def is_converted(model: nn.Module) -> bool:
    return any(hasattr(m, STATE_ATTR) or hasattr(m, NOOP_STATE_ATTR) for m in model.modules())


@dataclass(frozen=True)
class _Analysis:
    form: str
    delta: str
    input_norm: str
    inline: tuple[str, ...] = ()


NOT_RUN = (
    "it does not run in a forward on token ids alone (as a cross-attention layer that runs only with image "
    "inputs); leave it out of the routed layers"
)


def _analyse(block: nn.Module, spec: BlockCallSpec, name: str) -> _Analysis:
    """Capture the block as the parent calls it, extract Δ, and return its form, Δ kind, input norm and the
    children traced into.

    The input norm is the first norm module the graph applies to the hidden states themselves ("" if none,
    as in post-norm blocks); a skip path reads the skipped tokens through it. Children that add the residual
    themselves are traced into (:func:`modify.passes.capture_delta`).
    """
    if not spec.runs:
        raise UnsupportedModelError(name, NOT_RUN)
    if spec.position_tables:
        path = ".".join(map(str, spec.position_tables[0]))
        raise UnsupportedModelError(
            name,
            f"its argument '{path}' is a table over the model's maximum number of positions (an ALiBi table, say), "
            "of which the block takes its own rows by the sequence's length: routed tokens would get the rows of "
            "other positions",
        )
    gm, extract, inline = capture_delta(block, spec, name)
    analysis = extract.analysis
    assert analysis is not None
    norm = ""
    if analysis.decomposable:
        norms = [
            u for u in gm.graph.nodes if u in analysis.hidden.users and u.op == "call_module" and analysis.is_norm(u)
        ]
        if norms:
            module = gm.get_submodule(str(norms[0].target))
            norm = next(n for n, m in block.named_modules() if m is module)
    return _Analysis(analysis.form, extract.delta_kind, norm, inline)


def _cache_layer(block: nn.Module, index: int) -> int:
    """The block's layer in a Hugging Face cache: its attention's ``layer_idx``, else its stack index."""
    found = next((m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)), None)
    return index if found is None else found


def _skip_specs(skip_path: str | Sequence[str], skip_rank: int, count: int) -> list[str]:
    """One skip-path spec per routed block from a kind ("linear") or spec ("linear-32"), or one per block."""
    values = [skip_path] * count if isinstance(skip_path, str) else list(skip_path)
    if len(values) != count:
        raise ValueError(f"got {len(values)} skip paths for {count} routed blocks; give one value or one per block")
    return [v if v == "identity" or "-" in v else spec_name(v, skip_rank) for v in values]


def convert(
    model: nn.Module,
    capacity: float | Sequence[float] = 0.125,
    layers: Layers = "every-other",
    *,
    example_inputs: Callable[[int], dict[str, Any]] | None = None,
    plan: MoDConfig | None = None,
    keep_first: int = 0,
    skip_path: str | Sequence[str] = "identity",
    skip_rank: int = 32,
    causal: str | None = None,
    mode: str | None = None,
    kv: str | Sequence[str] = "routed",
) -> nn.Module:
    """Convert ``model`` to Mixture-of-Depths in place and return it.

    Args:
        model: a transformer, e.g. a Hugging Face ``AutoModelForCausalLM``.
        capacity: fraction of each sequence's tokens routed through a routed block, in [0, 1]; one value,
            or one per routed block. 1.0 reproduces the model; 0 removes the block (no token runs it).
        layers: "every-other" (blocks 1, 3, 5, ...: the paper's plan), "all", or a list of block indices.
            "all" and "every-other" leave out blocks that don't run on token ids alone (Mllama's
            cross-attention layers); a list naming one is refused.
        example_inputs: builds the model's keyword inputs for length T, used to learn how blocks are called;
            by default random token ids.
        keep_first: leading real tokens every routed block always processes (1 keeps a pretrained model's
            attention sink; 0, the default, is the paper's pure top-k).
        skip_path: what routed blocks give the tokens they skip: "identity" (nothing, the paper's rule),
            "linear" or "mlp" (see :mod:`modify.routing.skip_path`), one kind or one per routed block. A new skip path
            starts at zero, so it changes nothing until it is fitted (``modify calibrate``) or trained.
        skip_rank: rank of a "linear" skip path, hidden units of an "mlp" one.
        causal: how tokens decide alone when sampling: "threshold", "aux" or "predictor" (see
            :mod:`modify.routing.rules`); by default the plan's rule, else "threshold".
        mode: "staged" (the default: a Mixture-of-Depths router in front of each routed block) or
            "integrated" (a no-op expert in each routed block's Mixture-of-Experts router, dispatching
            ``capacity`` of each sequence's tokens to the experts; see :mod:`modify.moe.noop`). By default
            the plan's mode.
        kv: what a routed block's skipped tokens leave in its attention: "routed" (nothing: the paper's rule) or
            "all" (their keys and values, so routed tokens attend to every token; see
            :mod:`modify.routing.kv_all`), one option or one per routed block.
        plan: a saved plan to apply instead of ``capacity``, ``layers``, ``keep_first``, ``kv`` and the skip paths
            (its source is kept). A block that already carries a router or skip path (as when loading a
            converted checkpoint) keeps it and its weights.

    Raises:
        UnsupportedModelError: the model has no routable block stack, or a chosen block can't be routed.
        ValueError: a capacity outside [0, 1], a block index out of range, or an already converted model.
            Nothing is changed when an error is raised.
    """
    if is_converted(model):
        raise ValueError("the model is already converted; call modify.revert(model) first to convert it anew")
    config = getattr(model, "config", None)
    refusal = attention_refusal(config)
    if refusal:
        raise UnsupportedModelError("", refusal)
    model_type = getattr(config, "model_type", None)
    if model_type in UNROUTABLE_FAMILIES:
        raise UnsupportedModelError("", UNROUTABLE_FAMILIES[model_type])
    stack_name, stack = find_block_stack(model)
    blocks = list(stack)
    specs = probe_block_calls(model, blocks, example_inputs)
    if plan is None:
        routed = resolve_layers(layers, len(stack))
        if isinstance(layers, str):  # "all", "every-other": of the blocks that run on token ids
            routed = [i for i in routed if specs[i].runs] or routed
            if mode == "integrated":  # and, integrated, of those with a Mixture-of-Experts layer
                routed = [i for i in routed if find_moe(blocks[i]) is not None] or routed
        plan = MoDConfig(
            len(stack),
            routed,
            _capacities(capacity, len(routed)),
            block_stack=stack_name,
            keep_first=keep_first,
            skip_paths=_skip_specs(skip_path, skip_rank, len(routed)),
            kv=[kv] * len(routed) if isinstance(kv, str) else list(kv),
            causal=causal or "threshold",
            mode=mode or "staged",
        )
    elif plan.num_blocks != len(stack):
        raise ValueError(
            f"the plan is for {plan.num_blocks} blocks but the model has {len(stack)}; use the plan's model"
        )
    else:
        plan = MoDConfig.from_dict(
            {**plan.to_dict(), "block_stack": stack_name, "causal": causal or plan.causal, "mode": mode or plan.mode}
        )
    saved = {
        key: config.__dict__[key]
        for key in (CONFIG_KEY, LOAD_MARKER_KEY)
        if config is not None and key in config.__dict__
    }
    try:
        if plan.mode == "integrated":
            _convert_integrated(model, plan, stack_name, blocks)
        else:
            _convert_staged(model, plan, stack_name, blocks, specs)
        if config is not None:
            setattr(config, CONFIG_KEY, plan.to_dict())
            mark_loadable(config)
        install_model_hooks(model, plan.aux_loss_coef)
    except BaseException:
        # All or nothing: a late failure (a capture, a placement, an interrupt) leaves the model as it was.
        _undo(model, config, saved)
        raise
    return model


def _undo(model: nn.Module, config: Any, saved: dict[str, Any]) -> None:
    remove_model_hooks(model)
    for block, state in routed_blocks(model):
        uninstall(block, keep=state.kept)
    for moe, _ in noop_layers(model):
        uninstall_noop(moe)
    if config is not None:
        for key in (CONFIG_KEY, LOAD_MARKER_KEY):
            config.__dict__.pop(key, None)
        config.__dict__.update(saved)


def _convert_staged(
    model: nn.Module, plan: MoDConfig, stack_name: str, blocks: list[nn.Module], specs: list[BlockCallSpec]
) -> None:
    """Put a router in front of each routed block (all analysed and captured before any is changed)."""
    states = []
    for i, cap, skip, kv in zip(plan.routed, plan.capacities, plan.skip_paths, plan.kv):
        name = f"{stack_name}.{i}"
        found = _analyse(blocks[i], specs[i], name)
        forward_fn = type(blocks[i]).forward
        program = BlockProgram(
            specs[i], found.form, found.delta, forward_fn, inspect.signature(forward_fn), found.input_norm,
            found.inline, _cache_layer(blocks[i], i),
        )  # fmt: skip
        if kv == "all" and cap > 0.0:
            spec = specs[i]
            assert spec.structure is not None
            program.attention = find_attention(
                blocks[i], spec.structure, spec.examples[spec.structure], found.inline, name, spec.child_nones
            )
        plan_part = BlockPlan(i, name, cap, plan.keep_first, skip, plan.causal, kv)
        state = RoutingState(plan_part, program, device=block_device(model, name))
        state.prepare(blocks[i])
        if program.attention is not None:
            structure = specs[i].structure
            check_split(blocks[i], state, structure, specs[i].examples[structure])
        states.append(state)
    for state, threshold in zip(states, plan.thresholds):
        block, device = blocks[state.index], state.device
        dtype = next(block.parameters()).dtype
        hidden = state.spec.hidden_size
        state.kept = tuple(a for a in (ROUTER_ATTR, SKIP_ATTR, PREDICTOR_ATTR) if a in block._modules)
        # A new router starts random, not at zero: zero scores tie, so top-k would take each sequence's first
        # k tokens (a positional rule) and no score would pass a threshold of 0. Its gate scale starts at 0,
        # so every gate is still exactly 1 (see MoDRouter).
        router = getattr(block, ROUTER_ATTR, None) or MoDRouter(hidden, device=device, seed=state.index)
        path = getattr(block, SKIP_ATTR, None) or make_skip_path(state.skip_path, hidden, device, dtype)
        predictor = None
        if plan.causal == "predictor":
            predictor = getattr(block, PREDICTOR_ATTR, None) or MoDPredictor(hidden, plan.predictor_size, device=device)
        install(block, state, router, path, predictor)
        for attr in (ROUTER_ATTR, SKIP_ATTR, PREDICTOR_ATTR):
            if attr in block._modules and attr not in state.kept:
                register_offloaded(model, f"{state.name}.{attr}")
        keep_resident(model, f"{state.name}.{ROUTER_ATTR}")
        if not (ROUTER_ATTR in state.kept and bool(router.threshold.isfinite())):
            # (else a loaded checkpoint's, newer than its plan: a Trainer save doesn't refresh the plan)
            state.threshold = math.nan if threshold is None else threshold
        moe = find_moe(block)
        handle = leave_out_of_load_balancing(getattr(moe[1], MOE_PARTS[0]), state) if moe is not None else None
        if handle is not None:
            state.handles.append(handle)


def _convert_integrated(model: nn.Module, plan: MoDConfig, stack_name: str, blocks: list[nn.Module]) -> None:
    """Give each routed block's Mixture-of-Experts layer a no-op expert (all checked before any is changed)."""
    layers = []
    for i in plan.routed:
        found = find_moe(blocks[i])
        if found is None:
            raise UnsupportedModelError(
                f"{stack_name}.{i}",
                "it has no Mixture-of-Experts layer (a router 'gate' and 'experts') for a no-op expert; route it "
                "with mode='staged' or leave it out of the layers",
            )
        layers.append(found)
    for i, cap, (moe_name, moe) in zip(plan.routed, plan.capacities, layers):
        router = getattr(moe, MOE_PARTS[0]).weight
        state = NoOpState(f"{stack_name}.{i}.{moe_name}", i, cap, type(moe).forward, router.shape[0])
        device = block_device(model, f"{stack_name}.{i}.{moe_name}")
        noop = getattr(moe, NOOP_ATTR, None) or NoOpExpert(router.shape[1], device=device)
        install_noop(moe, state, noop)


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert` in place: routers removed, original forwards back, weights untouched."""
    remove_model_hooks(model)
    for block, _ in routed_blocks(model):
        uninstall(block)
    for moe, _ in noop_layers(model):
        uninstall_noop(moe)
    config = getattr(model, "config", None)
    if config is not None:
        config.__dict__.pop(CONFIG_KEY, None)
        unmark_loadable(config)
    return model


@contextlib.contextmanager
def routing_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run every routed block densely inside the context (routers kept)."""
    states: list[Any] = [state for _, state in routed_blocks(model)] + [state for _, state in noop_layers(model)]
    previous = [s.enabled for s in states]
    for s in states:
        s.enabled = False
    try:
        yield model
    finally:
        for s, flag in zip(states, previous):
            s.enabled = flag


def find_blocks(
    model: nn.Module, example_inputs: Callable[[int], dict[str, Any]] | None = None, strict: bool = True
) -> list[BlockInfo]:
    """The model's blocks, each with its index, name, form, Δ kind and routing.

    Unrouted blocks are probed and captured to find their form; nothing is changed. A block that can't be
    routed raises UnsupportedModelError, or with ``strict=False`` is reported with form "unroutable" and
    the reason.
    """
    stack_name, stack = find_block_stack(model)
    blocks = list(stack)
    states = {id(b): getattr(b, STATE_ATTR) for b in blocks if hasattr(b, STATE_ATTR)}
    noops = {state.index: state for _, state in noop_layers(model)}
    specs = None
    infos = []
    for i, block in enumerate(blocks):
        name = f"{stack_name}.{i}"
        state = states.get(id(block))
        if state is not None:
            kind = (state.form, state.delta)
            infos.append(BlockInfo(i, name, *kind, True, state.capacity, skip_path=state.skip_path, kv=state.kv))
            continue
        if i in noops:  # integrated: routed inside its Mixture-of-Experts layer, the block itself unanalysed
            infos.append(BlockInfo(i, name, "moe-noop", "", True, noops[i].capacity))
            continue
        if specs is None:
            with routing_disabled(model):
                specs = probe_block_calls(model, blocks, example_inputs)
        if not specs[i].runs:  # not an error of the model: it has nothing to route there on text alone
            infos.append(BlockInfo(i, name, "unroutable", "", False, None, NOT_RUN))
            continue
        try:
            found = _analyse(block, specs[i], name)
        except UnsupportedModelError as exc:
            if strict:
                raise
            infos.append(BlockInfo(i, name, "unroutable", "", False, None, exc.reason))
            continue
        infos.append(BlockInfo(i, name, found.form, found.delta, False, None))
    return infos
