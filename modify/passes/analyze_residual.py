"""Find a block's residual stream in its graph and classify the block.

The *trunk* is the chain of nodes that carries the block's input to its output: additions ``t + b`` where
exactly one operand is on the trunk (the other is a *branch*: attention, MLP, or their sum) and reshapes
of the trunk. When the output is on such a chain, the block is ``x + b_1 + ... + b_n`` up to reshapes,
and what it adds to the stream, Δ, can be taken from the graph exactly. Otherwise (a norm on the trunk,
as in post-norm OPT-350m or BERT) the block is still residual if its input reaches its output, but Δ can
only be had as ``block(x) - x``.

The analysis runs over the dataflow graph as a ``networkx.DiGraph`` and classifies the block with the first
matching :class:`BlockForm`; forms registered with :func:`register_block_form` are tried before the
built-in ones:

=========== ============================================================= =====================
form        shape                                                         e.g.
=========== ============================================================= =====================
parallel    ``x + (attn(n1(x)) + mlp(n2(x)))``: independent branches       GPT-NeoX, Phi
sandwich    sequential branches each ending in a norm                      Gemma2
pre-norm    sequential branches each entered through a norm                Llama, GPT-2, OPT-125m
residual    any other trunk of additions                                   —
post-norm   a norm on the trunk; Δ = block(x) - x                          OPT-350m, BERT
=========== ============================================================= =====================

It only reads the graph.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import fx

from modify.archs import NORM_CLASS_PATTERN
from modify.errors import NotResidualError, UnsupportedModelError

__all__ = [
    "ResidualAnalysis",
    "BlockForm",
    "analyze_residual",
    "register_block_form",
    "unregister_block_form",
    "block_forms",
    "ADD_TARGETS",
    "hidden_output",
]

ADD_TARGETS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_RESHAPE_TARGETS = {"view", "reshape", "contiguous", torch.reshape}
_NORM_FUNCTIONS = {torch.nn.functional.layer_norm, torch.nn.functional.group_norm, torch.nn.functional.rms_norm}


@dataclass
class ResidualAnalysis:
    """The residual structure of a captured block.

    Attributes:
        graph: the analysed graph.
        hidden: the placeholder of the hidden states.
        output: the node of the block's hidden-states output.
        trunk: nodes from ``hidden`` to ``output`` along the residual stream (empty if not decomposable).
        branches: for each addition on the trunk, its non-trunk operand.
        decomposable: the output is a trunk of additions and reshapes, so Δ is exact.
        dataflow: the graph as a networkx DiGraph over nodes.
        form: the name of the matched :class:`BlockForm`.
    """

    graph: fx.Graph
    hidden: fx.Node
    output: fx.Node
    trunk: list[fx.Node] = field(default_factory=list)
    branches: list[fx.Node] = field(default_factory=list)
    decomposable: bool = False
    dataflow: nx.DiGraph = field(default_factory=nx.DiGraph)
    form: str = ""

    def is_norm(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            owner = self.graph.owning_module
            module = owner.get_submodule(node.target) if owner is not None else None
            return module is not None and bool(NORM_CLASS_PATTERN.search(type(module).__name__))
        return node.op == "call_function" and node.target in _NORM_FUNCTIONS

    def branch_input(self, i: int) -> fx.Node:
        """The trunk node that branch ``i`` was added to."""
        add = self.trunk_adds()[i]
        return next(a for a in add.args if isinstance(a, fx.Node) and a is not self.branches[i])

    def trunk_adds(self) -> list[fx.Node]:
        return [n for n in self.trunk if _is_add(n)]

    def entries(self, i: int) -> list[fx.Node]:
        """Nodes of branch ``i`` that read the trunk's values (not just its shape) directly."""
        source = self.branch_input(i)
        region = nx.ancestors(self.dataflow, self.branches[i]) | {self.branches[i]}
        return [u for u in source.users if u in region and not _is_metadata(u)]

    def parts(self, i: int) -> list[fx.Node]:
        """Branch ``i`` split into the summands of its top-level additions."""
        out, stack = [], [self.branches[i]]
        while stack:
            node = stack.pop()
            if _is_add(node) and all(isinstance(a, fx.Node) for a in node.args[:2]):
                stack.extend(reversed(node.args[:2]))  # type: ignore[arg-type]
            else:
                out.append(node)
        return out


@dataclass(frozen=True)
class BlockForm:
    """A recognised block form.

    Attributes:
        name: short name shown by ``find_blocks`` and ``modify inspect``.
        matches: predicate over the analysis.
        description: one line for the docs.
    """

    name: str
    matches: Callable[[ResidualAnalysis], bool]
    description: str = ""


def _is_add(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in ADD_TARGETS and len(node.args) == 2


def _is_metadata(node: fx.Node) -> bool:
    """Reads only a tensor's shape, dtype or device."""
    return (node.op == "call_function" and node.target is getattr) or (
        node.op == "call_method" and node.target in ("size", "dim")
    )


def _is_reshape(node: fx.Node) -> bool:
    return node.op in ("call_method", "call_function") and node.target in _RESHAPE_TARGETS


def hidden_output(result: Any) -> tuple[Any, Callable[[Any], Any]]:
    """The hidden-states part of a block's graph output, and how to rebuild the output around a replacement
    (call it where new nodes may be inserted).

    Blocks return the hidden states alone, first in a tuple or list, or first in a tuple or list
    concatenated with another (``(h,) + outputs``, ``[h] + outputs[1:]``), which tracing records as one
    ``add`` of a literal and a node.
    """
    if isinstance(result, (tuple, list)) and result:
        inner, rebuild = hidden_output(result[0])
        return inner, lambda new: type(result)([rebuild(new), *result[1:]])
    if (
        isinstance(result, fx.Node)
        and result.op == "call_function"
        and result.target in (operator.add, operator.concat)
        and isinstance(result.args[0], (tuple, list))
        and result.args[0]
    ):
        head = result.args[0]
        inner, rebuild = hidden_output(head[0])

        def concat(new: Any) -> Any:  # a new node at the graph's insertion point, after ``new``
            return result.graph.call_function(result.target, (type(head)([rebuild(new), *head[1:]]), *result.args[1:]))

        return inner, concat
    return result, lambda new: new


def _walk_trunk(hidden: fx.Node, output: fx.Node) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """Trace the trunk back from ``output``; None when the output isn't a trunk of additions and reshapes."""
    trunk, branches, node = [output], [], output
    while node is not hidden:
        if _is_add(node):
            a, b = node.args
            if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
                return None
            trunk_arg = [arg for arg in (a, b) if _walk_trunk(hidden, arg) is not None]
            if len(trunk_arg) != 1:
                return None
            node = trunk_arg[0]
            branches.append(b if node is a else a)
        elif _is_reshape(node) and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        else:
            return None
        trunk.append(node)
    return trunk[::-1], branches[::-1]


def _node_ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _parallel(a: ResidualAnalysis) -> bool:
    for i in range(len(a.branches)):
        parts = a.parts(i)
        if len(parts) >= 2 and not any(nx.has_path(a.dataflow, p, q) for p in parts for q in parts if p is not q):
            return True
    return False


def _sequential(a: ResidualAnalysis) -> bool:
    return len(a.branches) >= 2


def _sandwich(a: ResidualAnalysis) -> bool:
    return _sequential(a) and all(a.is_norm(b) for b in a.branches)


def _pre_norm(a: ResidualAnalysis) -> bool:
    return _sequential(a) and all(
        (entries := a.entries(i)) and all(a.is_norm(e) for e in entries) for i in range(len(a.branches))
    )


_BUILTIN_FORMS = [
    BlockForm("parallel", lambda a: a.decomposable and _parallel(a), "attention and MLP read the same input"),
    BlockForm("sandwich", lambda a: a.decomposable and _sandwich(a), "each branch ends in a norm (Gemma2)"),
    BlockForm("pre-norm", lambda a: a.decomposable and _pre_norm(a), "each branch starts with a norm"),
    BlockForm("residual", lambda a: a.decomposable, "x plus branches; Δ is exact"),
    BlockForm("post-norm", lambda a: not a.decomposable, "a norm on the residual stream; Δ = block(x) - x"),
]
_USER_FORMS: list[BlockForm] = []


def register_block_form(form: BlockForm) -> None:
    """Register a form; registered forms are tried before the built-in ones, newest first."""
    _USER_FORMS.insert(0, form)


def unregister_block_form(name: str) -> None:
    """Remove a registered form by name (built-in forms can't be removed)."""
    _USER_FORMS[:] = [f for f in _USER_FORMS if f.name != name]


def block_forms() -> list[BlockForm]:
    return [*_USER_FORMS, *_BUILTIN_FORMS]


def analyze_residual(gm: fx.GraphModule, hidden: str, name: str = "") -> ResidualAnalysis:
    """Analyse the block captured in ``gm``; ``hidden`` names the hidden-states placeholder.

    Raises:
        UnsupportedModelError: the block's output does not depend on its input through a residual path.
    """
    graph = gm.graph
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    if hidden not in placeholders:
        raise UnsupportedModelError(name, f"its graph has no input named '{hidden}'")
    x = placeholders[hidden]
    out_node = next(n for n in graph.nodes if n.op == "output")
    out = hidden_output(out_node.args[0])[0]
    if not isinstance(out, fx.Node) or x not in _node_ancestors(out) | {out}:
        raise UnsupportedModelError(name, "its output does not depend on its input, so it has no residual stream")
    dataflow = nx.DiGraph()
    dataflow.add_nodes_from(graph.nodes)
    dataflow.add_edges_from((i, n) for n in graph.nodes for i in n.all_input_nodes)
    analysis = ResidualAnalysis(graph=graph, hidden=x, output=out, dataflow=dataflow)
    walked = _walk_trunk(x, out)
    if walked is not None and walked[1]:
        analysis.trunk, analysis.branches = walked
        analysis.decomposable = True
    elif not any(_is_add(n) for n in nx.ancestors(dataflow, out) | {out} if nx.has_path(dataflow, x, n)):
        raise NotResidualError(name, "its input is never added back to its output; it is not a residual block")
    analysis.form = next(f.name for f in block_forms() if f.matches(analysis))
    return analysis
