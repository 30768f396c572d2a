"""Rewrite a captured block so that it returns Δ, what it adds to the residual stream, instead of x + Δ.

A routed block computes only the selected tokens and adds ``g(r) · Δ`` back into the stream itself, so it
needs Δ without the residual: scatter-adding a block output that already contains x adds the residual
twice, a bug common in other Mixture-of-Depths code.

Δ is returned as its *parts*, one per addition on the trunk (see :mod:`modify.passes.analyze_residual`):
``(attn, mlp)`` for a pre-norm block, ``(attn + mlp,)`` for a parallel one, each mapped through the
reshapes the trunk passes through after it. Δ is their sum. The routed block adds ``g · part`` in the
order of the original additions, so with g = 1 it performs exactly the dense block's float operations:
capacity 1.0 reproduces the model bit for bit, not just within rounding. The intermediate trunk values
stay in the graph, since later branches read them. For a residual block whose output is not a trunk of
additions (post-norm) the single part is ``output - x``, exact up to rounding, and the pass says so.

Before (pre-norm, as ``gm.code``)::

    add = hidden_states + getitem                 # x + attn
    block_post_attention_layernorm = self.block.post_attention_layernorm(add)
    block_mlp = self.block.mlp(block_post_attention_layernorm)
    add_1 = add + block_mlp                       # (x + attn) + mlp
    return add_1

After::

    add = hidden_states + getitem
    block_post_attention_layernorm = self.block.post_attention_layernorm(add)
    block_mlp = self.block.mlp(block_post_attention_layernorm)
    return (getitem, block_mlp)                   # Δ = attn + mlp, in parts

A block returning a tuple keeps its other outputs; only the hidden states are replaced by the parts.
"""

from __future__ import annotations

import operator

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from modify.passes.analyze_residual import ResidualAnalysis, analyze_residual, hidden_output

__all__ = ["ExtractDeltaPass", "DELTA_META"]

#: ``node.meta["modify"]["delta"]`` on the output node: "exact" or "difference".
DELTA_META = "delta"


class ExtractDeltaPass(PassBase):
    """Make a captured block return the parts of Δ in place of its hidden-states output.

    Args:
        hidden: name of the hidden-states placeholder.
        name: qualified name of the block, for messages and provenance.

    After the pass, ``self.analysis`` holds the block's residual analysis and ``self.delta_kind`` is
    "exact" or "difference". Running it on a graph that already returns Δ changes nothing and reports so.
    """

    def __init__(self, hidden: str, name: str = "") -> None:
        super().__init__()
        self.hidden = hidden
        self.name = name
        self.analysis: ResidualAnalysis | None = None
        self.delta_kind = ""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        output = next(n for n in graph.nodes if n.op == "output")
        done = output.meta.get("modify", {}).get(DELTA_META)
        if done:
            self.delta_kind = done
            return PassResult(graph_module, False)
        analysis = self.analysis = analyze_residual(graph_module, self.hidden, self.name)
        with graph.inserting_before(output):
            if analysis.decomposable:
                parts, self.delta_kind = _delta_parts(graph, analysis), "exact"
            else:
                parts = [graph.call_function(operator.sub, (analysis.output, analysis.hidden))]
                self.delta_kind = "difference"
            _, rebuild = hidden_output(output.args[0])
            result = rebuild(tuple(parts))
        for part in parts:
            part.meta.setdefault("modify", {}).update({"pass": "extract_delta", "block": self.name})
        output.args = (result,)
        output.meta.setdefault("modify", {})[DELTA_META] = self.delta_kind
        graph.eliminate_dead_code()
        graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, True)


def _delta_parts(graph: fx.Graph, analysis: ResidualAnalysis) -> list[fx.Node]:
    """The branches in trunk order, each taken through the trunk reshapes that follow its addition."""
    parts: list[fx.Node] = []
    branches = iter(analysis.branches)
    adds = set(analysis.trunk_adds())
    for prev, node in zip(analysis.trunk, analysis.trunk[1:]):
        if node in adds:
            parts.append(next(branches))
        else:
            parts = [
                graph.create_node(
                    node.op, node.target, tuple(p if a is prev else a for a in node.args), dict(node.kwargs)
                )
                for p in parts
            ]
    return parts
