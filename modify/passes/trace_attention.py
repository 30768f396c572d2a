"""Capture a block with its attention module traced into, the attention function kept as one call.

:func:`capture_block` keeps every child as a leaf, so a block's attention is one opaque call. Splitting
attention into a key/value side and a query side (:mod:`modify.passes.split_attention`) needs the projections,
the position encoding and the cache write as nodes, and the attention function (eager, sdpa) as one node whose
``query``, ``key``, ``value`` and ``attention_mask`` arguments are visible. Two things stop plain ``fx`` there:

- attention code unpacks shapes, ``(*hidden_states.shape[:-1], -1, self.head_dim)``, which a ``Proxy`` can't
  do without knowing how many entries the shape has. The tracer here carries the real call's arguments as
  examples and, when code asks for the length of a traced value, evaluates that value (and only what it depends
  on, once each) on the examples. Lengths are all it reads off them: the graph stays free of sizes.
- the attention function comes out of transformers' ``ALL_ATTENTION_FUNCTIONS`` registry, or is the modeling
  file's ``eager_attention_forward`` passed as the registry's default. For the duration of the trace the
  registry's instance entries (its own override mechanism, restored after) hold wrappers that record one
  ``call_function`` node targeting the original function; see :data:`modify.archs.ATTENTION_REGISTRY`.

Which child holds the attention is found by structure, not by name (:func:`find_attention`): the first
non-norm child whose traced graph holds an attention function call.

Before (a Llama block, children as leaves)::

    block_self_attn = self.block.self_attn(hidden_states = block_input_layernorm, ...)

After (``inline=("self_attn",)``)::

    block_self_attn_q_proj = self.block.self_attn.q_proj(block_input_layernorm)
    view = block_self_attn_q_proj.view((getitem_1, getitem_2, -1, 8))
    ...
    sdpa_attention_forward = transformers_integrations_sdpa_attention_sdpa_attention_forward(
        block_self_attn, add, add_1, transpose_2, attention_mask, dropout = 0.0, scaling = 0.35, ...)
    ...
    block_self_attn_o_proj = self.block.self_attn.o_proj(contiguous)
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import torch
from torch import fx, nn

from modify.archs import ATTENTION_REGISTRY, EAGER_ATTENTION_FUNCTION, NORM_CLASS_PATTERN
from modify.errors import UnsupportedModelError
from modify.passes.capture_block import BlockTracer, CallStructure, _wrapper_class

__all__ = ["capture_attention", "find_attention", "attention_calls"]

#: ``node.meta["modify"]["attention"]`` is True on the attention function's call.
ATTENTION_META = "attention"


_UNAVAILABLE = object()


class _Proxy(fx.Proxy):
    """A proxy whose length is known: the tracer evaluates it on the examples."""

    def __len__(self) -> int:
        tracer = self.tracer
        assert isinstance(tracer, _AttentionTracer)
        return tracer.length(self)


class _AttentionTracer(BlockTracer):
    """:class:`BlockTracer` with example values for lengths, modules outside the block traced through, and the
    attention functions of :func:`_attention_leaves` recorded as single calls."""

    def __init__(
        self, block: nn.Module, inline: Collection[str], nones: Mapping[str, tuple[bool, ...]] | None,
        examples: list[Any],
    ) -> None:  # fmt: skip
        super().__init__(block, inline, nones)
        self.examples = examples
        self.values: dict[fx.Node, Any] = {}
        self.evaluating = False

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if self.evaluating:
            return forward(*args, **kwargs)
        try:
            self.path_of_module(m)
        except NameError:
            # A module object used as a function (transformers' hub kernels wrap ``apply_rotary_pos_emb`` so):
            # not part of the block, so trace through its code.
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        return attr_val if self.evaluating else super().getattr(attr, attr_val, parameter_proxy_cache)

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        return iter([obj[i] for i in range(self.length(obj))])

    def length(self, obj: fx.Proxy) -> int:
        return len(self._value(obj.node))

    def _value(self, node: fx.Node) -> Any:
        """``node`` evaluated on the examples (its inputs first, each once)."""
        if node in self.values:
            return self.values[node]
        if node.op == "placeholder":
            index = [n for n in self.graph.nodes if n.op == "placeholder"].index(node)
            value = self.examples[index]
        else:
            args = fx.node.map_arg(node.args, self._value)
            kwargs = fx.node.map_arg(node.kwargs, self._value)
            if node.op == "call_method" and args and args[0] is _UNAVAILABLE:
                if node.target != "update":
                    raise fx.proxy.TraceError(f"a length depends on {node.args[0]}, which isn't a tensor")
                # A cache's update returns the keys and values it was given after those it holds: the same
                # ranks, and ranks are all that is read off examples. The example cache itself is never touched.
                self.values[node] = args[1:3]
                return args[1:3]
            self.evaluating = True
            try:
                value = _run(self.root, node, args, kwargs)
            finally:
                self.evaluating = False
        self.values[node] = value
        return value


def _run(root: nn.Module, node: fx.Node, args: Any, kwargs: Any) -> Any:
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    if node.op == "call_module":
        return root.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "get_attr":
        return functools.reduce(getattr, str(node.target).split("."), root)
    raise AssertionError(f"can't evaluate a {node.op} node")


def _leaf(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        proxy = next((a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy)), None)
        if proxy is None:
            return fn(*args, **kwargs)
        out = proxy.tracer.create_proxy("call_function", fn, args, kwargs)
        out.node.meta.setdefault("modify", {})[ATTENTION_META] = True
        return out

    return wrapper


@contextlib.contextmanager
def _attention_leaves(block: nn.Module) -> Iterator[None]:
    """The registry's attention functions, and the eager one of each modeling file under ``block``, as leaves."""
    module_name, _, attr = ATTENTION_REGISTRY.rpartition(".")
    registry = getattr(importlib.import_module(module_name), attr)
    local = registry._local_mapping  # the registry's own per-instance overrides, restored below
    saved = dict(local)
    eager = {getattr(sys.modules[type(m).__module__], EAGER_ATTENTION_FUNCTION, None) for m in block.modules()} - {None}
    try:
        for key in list(registry.keys()):
            local[key] = _leaf(registry[key])
        if len(eager) == 1:
            # ``get_interface("eager", eager_attention_forward)`` returns its default when "eager" isn't a key
            local["eager"] = _leaf(next(iter(eager)))
        yield
    finally:
        local.clear()
        local.update(saved)


def attention_calls(gm: fx.GraphModule) -> list[fx.Node]:
    """The attention function calls of a graph made by :func:`capture_attention`."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.meta.get("modify", {}).get(ATTENTION_META)]


def capture_attention(
    block: nn.Module,
    structure: CallStructure,
    examples: list[Any],
    inline: Collection[str],
    name: str = "",
    nones: Mapping[str, tuple[bool, ...]] | None = None,
) -> fx.GraphModule:
    """Trace ``block`` for calls of ``structure`` with the children ``inline`` traced into and attention
    functions kept as calls (see the module docstring).

    Args:
        examples: the graph inputs of one real call of this structure (placeholder order); only lengths are
            read off them, and never off objects other than tensors (a cache), so tracing changes nothing.
    """
    # Objects (a cache) are never evaluated: what they'd do (write the cache) must not happen while tracing.
    examples = [v if torch.is_tensor(v) else _UNAVAILABLE for v in examples]
    wrapper = _wrapper_class(structure.placeholder_names())(block, type(block).forward, structure)
    was_training = block.training
    block.training = structure.training
    try:
        with _attention_leaves(block), torch.no_grad():
            tracer = _AttentionTracer(block, inline, nones, examples)
            graph = tracer.trace(wrapper)
    except Exception as exc:  # fx raises many types; name the block and keep the cause
        raise UnsupportedModelError(
            name or type(block).__name__, f"torch.fx could not trace into its attention ({exc})"
        ) from exc
    finally:
        block.training = was_training
    for node in graph.nodes:
        node.meta.setdefault("modify", {}).update({"pass": "capture_attention", "block": name})
    gm = fx.GraphModule(wrapper, graph, class_name=f"Captured{type(block).__name__}Attention")
    gm.graph.lint()
    return gm


def find_attention(
    block: nn.Module, structure: CallStructure, examples: list[Any], inline: tuple[str, ...] = (), name: str = "",
    nones: Mapping[str, tuple[bool, ...]] | None = None,
) -> tuple[str, ...]:  # fmt: skip
    """The children to trace into (``inline`` and one more, unless one of those holds it) so that the graph
    shows the block's attention function call.

    Raises:
        UnsupportedModelError: no child, traced into, shows exactly one attention function call.
    """
    candidates: list[tuple[str, ...]] = [inline] if inline else []
    for child, module in block.named_children():
        if child not in inline and not NORM_CLASS_PATTERN.search(type(module).__name__):
            candidates.append((*inline, child))
    reasons = []
    for tried in candidates:
        try:
            gm = capture_attention(block, structure, examples, tried, name, nones)
        except UnsupportedModelError as exc:
            reasons.append(f"{tried[-1]}: {exc.reason}")
            continue
        found = len(attention_calls(gm))
        if found == 1:
            return tried
        if found > 1:
            reasons.append(f"{tried[-1]}: {found} attention calls")
    detail = "; ".join(reasons[:2]) or "none of its children calls one"
    raise UnsupportedModelError(
        name or type(block).__name__,
        "kv='all' needs its attention split into a key/value side and a query side, but no child of the block, "
        f"traced into, shows one call of a transformers attention function ({detail}); use kv='routed'",
    )
