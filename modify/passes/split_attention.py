"""Split a block's Δ graph at its attention call into a key/value side and a query side.

With ``kv="all"`` every token of a routed block writes its keys and values, and only the routed tokens run the
query, the attention, its output projection and everything after (the MLP). The split is read off the graph of
:func:`modify.passes.trace_attention.capture_attention` after :class:`ExtractDeltaPass`, which holds one call of
an attention function ``attn(module, query, key, value, attention_mask, ...)``:

- the **key/value side** is what that call's ``key``, ``value`` and ``attention_mask`` are computed from: the
  block's input norm, the key and value projections and norms, the key's rotary encoding, the cache write when
  the call carries a cache. It runs on every token and returns ``(key, value, mask)``.
- the **query side** is the rest, with the call's key, value and mask replaced by three new inputs. It runs on
  the routed tokens only (their hidden states and per-token arguments gathered) with every token's keys and
  values; the mask it gets is the key/value side's, gathered on the query axis.

Nodes both sides need (the input norm, shape reads) are computed by each on its own tokens: the query side
recomputes the input norm for its k tokens, which keeps every shape in the graph its own.

Before (a Llama block's Δ graph, abridged)::

    block_input_layernorm = self.block.input_layernorm(hidden_states)
    q = ...self.block.self_attn.q_proj(block_input_layernorm)...    # rotary with position_embeddings_0/1
    k = ...self.block.self_attn.k_proj(block_input_layernorm)...
    v = ...self.block.self_attn.v_proj(block_input_layernorm)...
    attn = sdpa_attention_forward(block_self_attn, q, k, v, attention_mask, ...)
    o = self.block.self_attn.o_proj(attn[0].reshape(...))
    ...
    return (o, block_mlp)

After, the key/value side::

    block_input_layernorm = self.block.input_layernorm(hidden_states)
    k = ...self.block.self_attn.k_proj(block_input_layernorm)...
    v = ...self.block.self_attn.v_proj(block_input_layernorm)...
    return (k, v, attention_mask)

and the query side (``routed_key``, ``routed_value``, ``routed_mask`` are new inputs)::

    block_input_layernorm = self.block.input_layernorm(hidden_states)
    q = ...self.block.self_attn.q_proj(block_input_layernorm)...
    attn = sdpa_attention_forward(block_self_attn, q, routed_key, routed_value, routed_mask, ...)
    o = self.block.self_attn.o_proj(attn[0].reshape(...))
    ...
    return (o, block_mlp)

Neither side changes the block's modules; both share them with the input graph, which is left as it was.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from modify.archs import ATTENTION_PER_QUERY_ARGUMENTS, ATTENTION_ROLES
from modify.errors import UnsupportedModelError
from modify.passes.capture_block import CallStructure
from modify.passes.extract_delta import ExtractDeltaPass
from modify.passes.probe_block_calls import BlockCallSpec
from modify.passes.trace_attention import ATTENTION_META, attention_calls, capture_attention

__all__ = ["AttentionSplit", "SplitAttentionPass", "SPLIT_INPUTS", "split_attention"]

#: Names of the query side's three new inputs, after the block's own.
SPLIT_INPUTS = ("routed_key", "routed_value", "routed_mask")


@dataclass
class AttentionSplit:
    """The two sides of a block's Δ graph.

    Attributes:
        kv: takes the block's graph inputs, returns ``(key, value, mask)`` as the attention call gets them (mask
            None where the call gets none).
        query: takes the block's graph inputs and then :data:`SPLIT_INPUTS`; returns what the Δ graph returns.
        query_inputs: the block's graph inputs the query side reads (the others it may be given as they are).
        extra_inputs: the block's graph inputs that reach the attention call through its other arguments
            (position ids, say); see :data:`modify.archs.ATTENTION_PER_QUERY_ARGUMENTS`.
    """

    kv: fx.GraphModule
    query: fx.GraphModule
    query_inputs: frozenset[str]
    extra_inputs: frozenset[str]


def _ancestors(nodes: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(node.all_input_nodes)
    return seen


def _roles(call: fx.Node, name: str) -> dict[str, object]:
    """The attention call's query, key, value and mask, bound by the function's own parameter names."""
    try:
        bound = inspect.signature(call.target).bind(*call.args, **call.kwargs)  # type: ignore[arg-type]
    except TypeError as exc:
        raise UnsupportedModelError(name, f"its attention call doesn't fit its function's signature ({exc})") from exc
    missing = [r for r in ATTENTION_ROLES if r not in bound.arguments]
    if missing:
        raise UnsupportedModelError(
            name, f"its attention function {getattr(call.target, '__name__', call.target)} takes no {missing[0]!r}"
        )
    return {r: bound.arguments[r] for r in ATTENTION_ROLES}


class SplitAttentionPass(PassBase):
    """Split a Δ graph with one attention call; ``self.split`` holds the result. The input graph is unchanged.

    Args:
        name: qualified name of the block, for messages and provenance.
    """

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.name = name
        self.split: AttentionSplit | None = None

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        calls = attention_calls(graph_module)
        if len(calls) != 1:
            raise UnsupportedModelError(self.name, f"its graph holds {len(calls)} attention calls, not one")
        roles = _roles(calls[0], self.name)
        self.split = AttentionSplit(
            self._kv_side(graph_module, roles), *self._query_side(graph_module, calls[0], roles)
        )
        return PassResult(graph_module, False)

    def _kv_side(self, gm: fx.GraphModule, roles: dict[str, object]) -> fx.GraphModule:
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        graph.graph_copy(gm.graph, env)
        outputs = tuple(env[v] if isinstance(v, fx.Node) else v for v in (roles[r] for r in ATTENTION_ROLES[1:]))
        graph.output(outputs)
        return self._finish(gm, graph, "kv")

    def _query_side(
        self, gm: fx.GraphModule, call: fx.Node, roles: dict[str, object]
    ) -> tuple[fx.GraphModule, frozenset[str], frozenset[str]]:
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        out = graph.graph_copy(gm.graph, env)
        graph.output(out)
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        new = []
        for input_name in SPLIT_INPUTS:
            with graph.inserting_after(last):
                last = graph.placeholder(input_name)
            new.append(last)
        attn = env[call]
        bound = inspect.signature(call.target).bind(*attn.args, **attn.kwargs)  # type: ignore[arg-type]
        for role, node in zip(ATTENTION_ROLES[1:], new):
            bound.arguments[role] = node
        attn.args, attn.kwargs = tuple(bound.args), dict(bound.kwargs)
        query = self._finish(gm, graph, "query")
        qattn = next(n for n in query.graph.nodes if n.meta.get("modify", {}).get(ATTENTION_META))
        qroles = _roles(qattn, self.name)
        rest = [a for a in qattn.all_input_nodes if a is not qroles["query"] and a.name not in SPLIT_INPUTS]
        extra = frozenset(n.name for n in _ancestors(rest) if n.op == "placeholder")
        if any(n.op == "call_method" and n.target == "update" for n in query.graph.nodes):
            raise UnsupportedModelError(self.name, "its query side writes the cache")
        inputs = [n for n in query.graph.nodes if n.op == "placeholder" and n.name not in SPLIT_INPUTS]
        return query, frozenset(n.name for n in inputs if n.users), extra

    def _finish(self, gm: fx.GraphModule, graph: fx.Graph, side: str) -> fx.GraphModule:
        out = fx.GraphModule(gm, graph, class_name=f"{type(gm).__name__}{side.capitalize()}")
        out.graph.eliminate_dead_code()
        out.graph.lint()
        for node in out.graph.nodes:
            node.meta.setdefault("modify", {}).update({"split": side, "block": self.name})
        out.recompile()
        return out


def split_attention(
    block: nn.Module, structure: CallStructure, examples: list[Any], inline: tuple[str, ...], spec: BlockCallSpec,
    name: str = "",
) -> AttentionSplit:  # fmt: skip
    """Capture ``block`` for calls of ``structure`` with ``inline`` traced into, extract Δ, and split it.

    Raises:
        UnsupportedModelError: the graph doesn't split, or a per-token argument reaches the attention call by
            another way than its query, keys, values and mask (it would need a query axis and a key axis).
    """
    gm = capture_attention(block, structure, examples, inline, name, spec.child_nones)
    ExtractDeltaPass(spec.hidden, name)(gm)
    split_pass = SplitAttentionPass(name)
    split_pass(gm)
    assert split_pass.split is not None
    per_token = {
        p for path in spec.token_dims for p in CallStructure(((path[0], "tensor"),), False).placeholder_names()
    } | {"_".join(map(str, path)) for path in spec.token_dims}
    odd = sorted(n for n in split_pass.split.extra_inputs & per_token if n not in ATTENTION_PER_QUERY_ARGUMENTS)
    if odd:
        raise UnsupportedModelError(
            name,
            f"its attention function gets {odd[0]!r}, which indexes tokens, beside its query, keys, values and "
            "mask: kv='all' can't tell its query axis from its key axis; use kv='routed'",
        )
    return split_pass.split
