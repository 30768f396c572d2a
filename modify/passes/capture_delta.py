"""Capture a block and extract its Δ, tracing into the children that add the residual themselves.

Most blocks add the residual in their own forward, visible in the graph :func:`capture_block` makes with every
child as a leaf. Some hand the stream to a child that adds it inside: BLOOM's attention and MLP take the
residual as an argument and return ``dense(h) + residual``. With those children as leaves the block's input
never reaches its output through an addition, and the residual analysis refuses it. A residual added inside a
child is still a residual, so the block is captured again with such children traced into (their own children
stay leaves), one at a time, until Δ is exact or none is left.

Before (BLOOM, children as leaves; the block's input never reaches an addition)::

    block_self_attention = self.block.self_attention(block_input_layernorm, hidden_states, ...)
    getitem = block_self_attention[0]
    ...
    block_mlp = self.block.mlp(block_post_attention_layernorm, getitem)
    return (block_mlp, getitem_1)

After (``inline=("self_attention", "mlp")``, Δ exact, form pre-norm)::

    block_self_attention_dense = self.block.self_attention.dense(reshape_3)
    dropout = torch.nn.functional.dropout(block_self_attention_dense, p = 0.0, training = False, inplace = False)
    add_1 = hidden_states + dropout
    ...
    block_mlp_dense_4h_to_h = self.block.mlp.dense_4h_to_h(block_mlp_gelu_impl)
    dropout_1 = torch.nn.functional.dropout(block_mlp_dense_4h_to_h, p = 0.0, training = False, inplace = False)
    add_2 = add_1 + dropout_1
    return (add_2, block_self_attention_attention_dropout)

A child is a candidate when it is not a norm and the graph hands it the block's input, or a sum computed from
it. A child whose forward fx can't trace stays a leaf. It only reads the block.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from modify.archs import NORM_CLASS_PATTERN
from modify.errors import NotResidualError, UnsupportedModelError
from modify.passes.analyze_residual import ADD_TARGETS
from modify.passes.capture_block import capture_block
from modify.passes.extract_delta import ExtractDeltaPass
from modify.passes.probe_block_calls import BlockCallSpec

__all__ = ["capture_delta", "children_given_the_stream"]


def _extract(block: nn.Module, spec: BlockCallSpec, name: str, inline: tuple[str, ...]) -> Any:
    gm = capture_block(block, spec.structure, type(block).forward, name, inline, spec.child_nones)
    extract = ExtractDeltaPass(spec.hidden, name)
    extract(gm)
    return gm, extract


def children_given_the_stream(gm: fx.GraphModule, inline: tuple[str, ...]) -> list[str]:
    """Child modules (not norms) that the captured graph hands the block's input, or a sum computed from it:
    the ones that may add the residual inside (BLOOM's attention and MLP take it as an argument)."""
    hidden = next(n for n in gm.graph.nodes if n.op == "placeholder")
    downstream, todo = {hidden}, [hidden]
    while todo:
        for user in todo.pop().users:
            if user not in downstream:
                downstream.add(user)
                todo.append(user)
    names = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith("block."):
            continue
        child = str(node.target).removeprefix("block.")
        parent = max((i + "." for i in inline if child.startswith(i + ".")), key=len, default="")
        if "." in child.removeprefix(parent):  # only children of the block or of a child traced into
            continue
        if NORM_CLASS_PATTERN.search(type(gm.get_submodule(str(node.target))).__name__) or child in names:
            continue
        inputs = [a for a in node.all_input_nodes if a is hidden or (a in downstream and a.target in ADD_TARGETS)]
        if inputs:
            names.append(child)
    return names


def capture_delta(
    block: nn.Module, spec: BlockCallSpec, name: str = ""
) -> tuple[fx.GraphModule, ExtractDeltaPass, tuple[str, ...]]:
    """The block's Δ graph as its parent calls it (``spec``), the pass that made it (its ``analysis`` and
    ``delta_kind``), and the children traced into (pass them to :func:`capture_block` for later captures).

    Raises:
        UnsupportedModelError: the block isn't residual, even with the children it hands the stream traced into.
    """
    inline: tuple[str, ...] = ()
    try:
        gm, extract = _extract(block, spec, name, inline)
        return gm, extract, inline
    except NotResidualError as exc:
        found, error, tried = None, exc, set()
    gm = capture_block(block, spec.structure, type(block).forward, name, (), spec.child_nones)
    while (new := next((c for c in children_given_the_stream(gm, inline) if c not in tried), None)) is not None:
        tried.add(new)
        try:  # a child whose forward fx can't trace stays a leaf
            gm = capture_block(block, spec.structure, type(block).forward, name, (*inline, new), spec.child_nones)
        except UnsupportedModelError as retry:
            error = retry
            continue
        inline = (*inline, new)
        try:
            found = (*_extract(block, spec, name, inline), inline)
        except UnsupportedModelError as retry:
            error = retry
            continue
        if found[1].delta_kind == "exact":
            break
    if found is None:
        raise error from None
    return found
