"""Capture one transformer block as a torch.fx graph.

transformers 5 has no whole-model FX support and its top-level forwards don't trace, but a single block
does, once its child modules (attention, MLP, norms) are kept as leaves and its arguments are split into
graph inputs and constants. The block's forward is called through a thin wrapper whose forward takes one
explicit argument per tensor, so that decorated forwards (``@deprecate_kwarg``) and ``**kwargs`` see plain
Python values, tuples such as ``position_embeddings`` stay tuples, and flags such as ``use_cache`` or
``self.training`` are constants that prune the block's control flow.

Before (a Llama decoder layer, as Python)::

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                use_cache=False, position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, ...)
        hidden_states = residual + hidden_states
        ...

After (the captured graph, ``gm.code``)::

    def forward(self, hidden_states, attention_mask, position_ids, position_embeddings_0, position_embeddings_1):
        block_input_layernorm = self.block.input_layernorm(hidden_states)
        block_self_attn = self.block.self_attn(hidden_states = block_input_layernorm, attention_mask = attention_mask,
            position_ids = position_ids, cache = None, use_cache = False,
            position_embeddings = (position_embeddings_0, position_embeddings_1))
        getitem = block_self_attn[0]
        add = hidden_states + getitem
        block_post_attention_layernorm = self.block.post_attention_layernorm(add)
        block_mlp = self.block.mlp(block_post_attention_layernorm)
        add_1 = add + block_mlp
        return add_1

The block's modules and parameters are shared with the graph, not copied.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from modify.errors import UnsupportedModelError

__all__ = ["CallStructure", "BlockTracer", "capture_block", "call_structure"]

_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)


@dataclass(frozen=True)
class CallStructure:
    """The shape of one call: for each argument, a nested description of its leaves.

    A leaf is ``"tensor"`` or ``"object"`` (a graph input) or ``("const", value)`` (baked into the graph).
    Two calls with equal structures can share one captured graph; it is the key of the graph cache.
    """

    entries: tuple[tuple[str, Any], ...]
    training: bool

    def placeholder_names(self) -> list[str]:
        names: list[str] = []

        def walk(desc: Any, name: str) -> None:
            if desc in ("tensor", "object"):
                names.append(re.sub(r"\W", "_", name))
            elif desc[0] in ("tuple", "list"):
                for i, item in enumerate(desc[1]):
                    walk(item, f"{name}_{i}")
            elif desc[0] == "dict":
                for key, item in desc[1]:
                    walk(item, f"{name}_{key}")

        for key, desc in self.entries:
            walk(desc, key)
        return names

    def rebuild(self, leaves: tuple[Any, ...]) -> dict[str, Any]:
        """The keyword arguments of the call, from the graph inputs in placeholder order."""
        it = iter(leaves)

        def build(desc: Any) -> Any:
            if desc in ("tensor", "object"):
                return next(it)
            if desc[0] == "const":
                return desc[1]
            if desc[0] == "dict":
                return {key: build(item) for key, item in desc[1]}
            items = [build(item) for item in desc[1]]
            return tuple(items) if desc[0] == "tuple" else items

        return {key: build(desc) for key, desc in self.entries}


def _describe(value: Any) -> Any:
    if torch.is_tensor(value):
        return "tensor"
    if isinstance(value, _CONSTANT_TYPES):
        return ("const", value)
    if isinstance(value, (tuple, list)):
        return ("tuple" if isinstance(value, tuple) else "list", tuple(_describe(v) for v in value))
    if type(value) is dict and all(isinstance(k, str) for k in value):  # masks by kind (ZAYA: causal, conv)
        return ("dict", tuple((k, _describe(v)) for k, v in value.items()))
    return "object"


def _leaves(value: Any) -> list[Any]:
    if type(value) is dict and all(isinstance(k, str) for k in value):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if torch.is_tensor(value) or not isinstance(value, (tuple, list)):
        return [] if isinstance(value, _CONSTANT_TYPES) else [value]
    return [leaf for v in value for leaf in _leaves(v)]


def call_structure(named: dict[str, Any], training: bool) -> tuple[CallStructure, list[Any]]:
    """Split a named call into its structure and its graph inputs (in placeholder order)."""
    structure = CallStructure(tuple((k, _describe(v)) for k, v in named.items()), training)
    return structure, [leaf for v in named.values() for leaf in _leaves(v)]


class BlockTracer(fx.Tracer):
    """Traces a block's own forward and keeps every module below it as a leaf call, except the children
    named in ``inline``, whose forwards are traced too (their own children are leaves)."""

    def __init__(
        self, block: nn.Module, inline: Collection[str] = (), nones: Mapping[str, tuple[bool, ...]] | None = None
    ) -> None:
        super().__init__()
        self.block = block
        self.inlined = {id(block.get_submodule(n)) for n in inline}
        self.nones = {id(block.get_submodule(n)): flags for n, flags in (nones or {}).items()}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self.block and id(m) not in self.inlined

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        flags = self.nones.get(id(m))
        if flags is None or not self.is_leaf_module(m, ""):
            return out
        # The child returned a tuple with None in these places when probed (GPT-NeoX-Japanese's attention
        # returns a bias only in its last layer): give the block's code those Nones, so that its
        # ``if bias is not None`` takes this instance's branch rather than always the proxy's.
        return tuple(None if none else out[i] for i, none in enumerate(flags))


class _BlockCall(nn.Module):
    """Calls ``forward_fn(block, **kwargs)`` with kwargs rebuilt from explicit tensor arguments."""

    def __init__(self, block: nn.Module, forward_fn: Callable[..., Any], structure: CallStructure) -> None:
        super().__init__()
        self.block = block
        self._forward_fn = forward_fn
        self._structure = structure

    def _run(self, leaves: tuple[Any, ...]) -> Any:
        return self._forward_fn(self.block, **self._structure.rebuild(leaves))


def _wrapper_class(names: list[str]) -> type[_BlockCall]:
    # fx names placeholders after the forward's parameters, so generate one with explicit names.
    params = ", ".join(names)
    source = f"def forward(self, {params}):\n    return self._run(({params}{',' if names else ''}))\n"
    namespace: dict[str, Any] = {}
    exec(compile(source, "<modify.capture_block>", "exec"), namespace)
    return type("BlockCall", (_BlockCall,), {"forward": namespace["forward"]})


def capture_block(
    block: nn.Module,
    structure: CallStructure,
    forward_fn: Callable[..., Any] | None = None,
    name: str = "",
    inline: Collection[str] = (),
    nones: Mapping[str, tuple[bool, ...]] | None = None,
) -> fx.GraphModule:
    """Trace ``block`` for calls of the given structure.

    Args:
        block: the block; its own ``training`` flag is set to ``structure.training`` while tracing.
        structure: from :func:`call_structure` on a real call.
        forward_fn: the unbound forward to trace; by default the block class's ``forward``.
        name: qualified name of the block, recorded in ``node.meta["modify"]``.
        inline: names of child modules to trace into rather than call as leaves (children that add the
            residual themselves, as BLOOM's attention and MLP do; see :func:`modify.api` ``_analyse``).
        nones: module name (relative to the block) -> which places of the tuple it returns were None when
            probed (:attr:`BlockCallSpec.child_nones`); those calls give the block's code real Nones.

    Returns:
        A GraphModule whose inputs are the call's tensors and objects in placeholder order and whose output
        is the block's output. Its modules are the block's own (shared, not copied), under ``block.``.
    """
    fn = forward_fn or type(block).forward
    names = structure.placeholder_names()
    wrapper = _wrapper_class(names)(block, fn, structure)
    was_training = block.training
    block.training = structure.training
    try:
        graph = BlockTracer(block, inline, nones).trace(wrapper)
    except Exception as exc:  # fx raises many types; name the block and keep the cause
        raise UnsupportedModelError(
            name or type(block).__name__, f"torch.fx could not trace its forward ({exc})"
        ) from exc
    finally:
        block.training = was_training
    for node in graph.nodes:
        node.meta["modify"] = {"pass": "capture_block", "block": name}
    gm = fx.GraphModule(wrapper, graph, class_name=f"Captured{type(block).__name__}")
    gm.graph.lint()
    return gm
