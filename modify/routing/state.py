"""What a routed block carries besides its modules, in three parts and a set of attachments.

- :class:`BlockPlan`: what the plan (:class:`modify.config.MoDConfig`) records for the block: its capacity,
  skip path, causal rule and always-routed leading tokens.
- :class:`BlockProgram`: what conversion captured: how the parent calls the block, the block's form, and the
  Δ graphs of its calls (:mod:`modify.passes`).
- the run-time mode, one switch (:data:`MODES`): "auto", "topk", "causal" or "dense" (routing disabled).
  Whether the model is inside ``generate()`` is the model's fact, shared by its blocks (:class:`Generation`).
- :class:`BlockHooks`: what attaches from outside: observers of each selection, the causal rule's losses of
  the current forward (collected by the model's output hook) and the model's own padding for blocks that get
  no mask. Each ``add_*`` returns a handle whose ``remove()`` detaches it, as torch's module hooks do.

:class:`RoutingState` holds the parts; its flat attributes (``state.capacity``, ``state.spec``, ``state.enabled``,
``state.observer``) read and write them.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from modify.passes.capture_block import CallStructure, capture_block
from modify.passes.extract_delta import ExtractDeltaPass
from modify.passes.probe_block_calls import BlockCallSpec
from modify.passes.split_attention import AttentionSplit, split_attention
from modify.routing.placement import Wrapped
from modify.routing.selection import capacity_tokens, select_tokens

__all__ = [
    "STATE_ATTR",
    "MODES",
    "BlockPlan",
    "BlockProgram",
    "BlockHooks",
    "Generation",
    "RoutingState",
    "routed_blocks",
]

#: Attribute of a routed block holding its :class:`RoutingState` (a plain object: not in the state dict).
STATE_ATTR = "_modify_routing"
#: The run-time modes: "auto" (causal inside ``generate()``, else top-k), "topk", "causal", "dense".
MODES = ("auto", "topk", "causal", "dense")

Observer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class BlockPlan:
    """The block's entry in the plan.

    Attributes:
        index: position in the block stack.
        name: qualified name of the block.
        capacity: fraction of tokens routed through the block (0: removed).
        keep_first: leading real tokens always routed (see :func:`modify.routing.selection.select_tokens`).
        skip_path: the spec of the block's skip path ("identity": skipped tokens get nothing).
        causal: how a token decides alone when sampling (see :mod:`modify.routing.rules`).
        kv: what a skipped token leaves in the block's attention: "routed" (nothing, the paper's rule) or "all"
            (its keys and values; see :mod:`modify.routing.kv_all`).
    """

    index: int
    name: str
    capacity: float
    keep_first: int = 0
    skip_path: str = "identity"
    causal: str = "threshold"
    kv: str = "routed"


@dataclass
class BlockProgram:
    """What conversion captured of the block.

    Attributes:
        spec: how the parent calls the block (from probing).
        form: block form found by the residual analysis.
        delta: "exact" or "difference" (see :mod:`modify.passes.extract_delta`).
        forward_fn: the block class's own forward.
        signature: its signature, to bind calls.
        input_norm: name of the block's input norm, which the skip path reads through ("" when none).
        inline: children traced into when capturing, because they add the residual themselves.
        cache_layer: index of the block's layer in a Hugging Face cache (its attention's ``layer_idx``).
        graphs: the Δ graph of each call structure seen.
        attention: for ``kv="all"``: the children traced into so that the attention call shows (see
            :func:`modify.passes.trace_attention.find_attention`); None when the block isn't split.
        splits: the key/value and query sides of the Δ graph of each call structure seen (``kv="all"``).
    """

    spec: BlockCallSpec
    form: str
    delta: str
    forward_fn: Callable[..., Any]
    signature: inspect.Signature
    input_norm: str = ""
    inline: tuple[str, ...] = ()
    cache_layer: int = 0
    graphs: dict[CallStructure, fx.GraphModule] = field(default_factory=dict)
    attention: tuple[str, ...] | None = None
    splits: dict[CallStructure, AttentionSplit] = field(default_factory=dict)

    def split(self, block: nn.Module, structure: CallStructure, examples: list[Any], name: str) -> AttentionSplit:
        """The key/value and query sides for calls of this structure, captured now (on ``examples``, the graph
        inputs of one such call) if not yet."""
        found = self.splits.get(structure)
        if found is None:
            assert self.attention is not None, "the block was converted with kv='routed'"
            found = split_attention(block, structure, examples, self.attention, self.spec, name)
            self.splits[structure] = found
        return found

    def graph(self, block: nn.Module, structure: CallStructure, name: str) -> fx.GraphModule:
        """The Δ graph for calls of this structure, captured now if not yet."""
        gm = self.graphs.get(structure)
        if gm is None:
            gm = capture_block(block, structure, self.forward_fn, name, self.inline, self.spec.child_nones)
            ExtractDeltaPass(self.spec.hidden, name)(gm)
            self.graphs[structure] = gm
        return gm


class _Handle:
    def __init__(self, hooks: list[Any], fn: Any) -> None:
        self._hooks, self._fn = hooks, fn

    def remove(self) -> None:
        if self._fn in self._hooks:
            self._hooks.remove(self._fn)


@dataclass
class BlockHooks:
    """What attaches to a routed block from outside.

    Attributes:
        selection: called as ``fn(scores, idx, gate)`` (detached) on every top-k call; training's selection
            statistics and threshold fitting use them.
        topk: called as ``fn(block, x, scores, idx, padding)`` on every top-k call, before the block runs; the
            agreement measurement uses them (``modify.measure_agreement``).
        aux_losses: the causal rule's losses of the current forward, collected by the model's output hook.
        input_padding: [B, P + T] bool, True at padding, from the model's ``attention_mask`` while it runs, for
            blocks that get no mask of their own (set by the model's hooks).
    """

    selection: list[Observer] = field(default_factory=list)
    topk: list[Callable[..., None]] = field(default_factory=list)
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    input_padding: torch.Tensor | None = None

    def add_selection(self, fn: Observer) -> _Handle:
        self.selection.append(fn)
        return _Handle(self.selection, fn)

    def add_topk(self, fn: Callable[..., None]) -> _Handle:
        self.topk.append(fn)
        return _Handle(self.topk, fn)


@dataclass
class Generation:
    """Whether the model is inside ``generate()``: one object shared by every routed layer of a model."""

    active: bool = False


def _part(part: str, name: str) -> property:
    def get(self: Any) -> Any:
        return getattr(getattr(self, part), name)

    def put(self: Any, value: Any) -> None:
        setattr(getattr(self, part), name, value)

    return property(get, put, doc=f"``{part}.{name}``")


@dataclass
class RoutingState:
    """A routed block's plan, program, mode and attachments, and what :func:`modify.routing.forward.install` put.

    Attributes:
        plan, program, hooks: see the module docstring.
        mode: the run-time switch (:data:`MODES`).
        relaxed: the router phase of training: top-k with a straight-through gradient for every token's score
            (see :mod:`modify.routing.forward`); only in training mode. ``relax_temperature`` scales its width.
        generation: the model's :class:`Generation`.
        router: the block's router; ``threshold`` reads and writes its buffer.
        device: where the block computes (its accelerate hook's execution device, else its weights' device).
        handles: hooks on the block's modules that uninstalling removes.
        wrapped: where the routed forward was put, for uninstalling.
        kept: the block's modules (router, skip path, predictor) that were there before conversion (a loaded
            checkpoint's), which undoing a failed conversion leaves in place.
        threshold_started: the router's threshold was seen to hold a number, so the causal rule no longer
            computes the quantile that would start it (a decode step's cost); setting ``threshold`` clears it.
    """

    plan: BlockPlan
    program: BlockProgram
    mode: str = "auto"
    relaxed: bool = False
    relax_temperature: float = 1.0
    generation: Generation = field(default_factory=Generation)
    hooks: BlockHooks = field(default_factory=BlockHooks)
    router: nn.Module | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    handles: list[Any] = field(default_factory=list)
    wrapped: Wrapped | None = None
    kept: tuple[str, ...] = ()
    threshold_started: bool = False
    _resume: str = field(default="auto", repr=False)
    _observer: Any = field(default=None, repr=False)

    index = _part("plan", "index")
    name = _part("plan", "name")
    capacity = _part("plan", "capacity")
    keep_first = _part("plan", "keep_first")
    skip_path = _part("plan", "skip_path")
    causal = _part("plan", "causal")
    kv = _part("plan", "kv")
    spec = _part("program", "spec")
    form = _part("program", "form")
    delta = _part("program", "delta")
    forward_fn = _part("program", "forward_fn")
    signature = _part("program", "signature")
    input_norm = _part("program", "input_norm")
    inline = _part("program", "inline")
    cache_layer = _part("program", "cache_layer")
    graphs = _part("program", "graphs")
    aux_losses = _part("hooks", "aux_losses")
    input_padding = _part("hooks", "input_padding")

    @property
    def enabled(self) -> bool:
        """False in mode "dense" (``modify.routing_disabled``): the block runs densely."""
        return self.mode != "dense"

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if not value and self.mode != "dense":
            self._resume, self.mode = self.mode, "dense"
        elif value and self.mode == "dense":
            self.mode = self._resume

    def switch(self, mode: str) -> str:
        """Set the routing mode ("auto", "topk" or "causal"); inside ``routing_disabled`` it applies once the block
        routes again. Returns the previous one."""
        if self.mode == "dense":
            previous, self._resume = self._resume, mode
        else:
            previous, self.mode = self.mode, mode
        return previous

    @property
    def generating(self) -> bool:
        return self.generation.active

    @property
    def observer(self) -> Observer | None:
        """One selection observer, set and replaced by assignment (others attach with ``hooks.add_selection``)."""
        return self._observer

    @observer.setter
    def observer(self, fn: Observer | None) -> None:
        if self._observer is not None:
            self._observer.remove()
        self._observer = self.hooks.add_selection(fn) if fn is not None else None

    @property
    def threshold(self) -> float:
        """The block's decision threshold for the "threshold" rule (its router's ``threshold`` buffer); NaN
        until fitted, trained or set from the first text it decides on (see :mod:`modify.routing.rules`)."""
        assert self.router is not None, "the block is not routed"
        return float(self.router.threshold)

    @threshold.setter
    def threshold(self, value: float) -> None:
        assert self.router is not None, "the block is not routed"
        self.router.threshold.fill_(value)
        self.threshold_started = False

    def topk(self, scores: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """[B, k] the top-k rule's tokens of each row, k from the block's capacity."""
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
                examples = self.spec.examples.get(structure)
                for training in (False, True):
                    mode = dataclasses.replace(structure, training=training)
                    self.graph(block, mode)
                    if self.kv == "all" and examples is not None:
                        self.program.split(block, mode, examples, self.name)

    def graph(self, block: nn.Module, structure: CallStructure) -> fx.GraphModule:
        return self.program.graph(block, structure, self.name)


def routed_blocks(model: nn.Module) -> list[tuple[nn.Module, RoutingState]]:
    """The model's routed blocks with their states, in module order."""
    return [(m, getattr(m, STATE_ATTR)) for m in model.modules() if hasattr(m, STATE_ATTR)]
