"""Capture, residual analysis and Δ extraction on hand-written blocks (M / pattern / comparison idiom).

The toy pre-norm block::

    x ──┬── norm1 ── attn ──┐
        └──────────────── (+) = h ──┬── norm2 ── mlp ──┐
                                    └─────────────── (+) = out
"""

from __future__ import annotations

import operator

import pytest
import torch

from modify import UnsupportedModelError
from modify.passes import (
    BlockForm,
    ExtractDeltaPass,
    analyze_residual,
    block_forms,
    call_structure,
    capture_block,
    register_block_form,
    unregister_block_form,
)
from tests.helpers import ToyBlock


def _capture(kind: str) -> tuple[ToyBlock, torch.fx.GraphModule, torch.Tensor]:
    block = ToyBlock(8, kind).eval()
    x = torch.randn(2, 5, 8)
    structure, _ = call_structure({"x": x, "scale": None}, training=False)
    return block, capture_block(block, structure, name="toy"), x


def test_capture_keeps_children_as_leaves_and_shares_them() -> None:
    block, gm, x = _capture("pre-norm")
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["block.norm1", "block.attn", "block.norm2", "block.mlp"]
    assert gm.get_submodule("block.mlp") is block.mlp
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert torch.equal(gm(x), block(x))
    assert all(n.meta["modify"]["block"] == "toy" for n in gm.graph.nodes)


@pytest.mark.parametrize(
    "kind,form,branches", [("pre-norm", "pre-norm", 2), ("parallel", "parallel", 1), ("post-norm", "post-norm", 0)]
)
def test_forms(kind: str, form: str, branches: int) -> None:
    _, gm, _ = _capture(kind)
    analysis = analyze_residual(gm, "x")
    assert analysis.form == form
    assert len(analysis.branches) == branches
    assert analysis.decomposable == (branches > 0)


def test_non_residual_block_is_rejected() -> None:
    _, gm, _ = _capture("no-residual")
    with pytest.raises(UnsupportedModelError, match="no residual stream|never added back"):
        analyze_residual(gm, "x", "toy")


@pytest.mark.parametrize(
    "kind,parts,kind_of_delta", [("pre-norm", 2, "exact"), ("parallel", 1, "exact"), ("post-norm", 1, "difference")]
)
def test_extract_delta_returns_the_parts_of_delta(kind: str, parts: int, kind_of_delta: str) -> None:
    block, gm, x = _capture(kind)
    extract = ExtractDeltaPass("x", "toy")
    result = extract(gm)
    assert result.modified and extract.delta_kind == kind_of_delta
    gm.graph.lint()
    out = result.graph_module(x)
    assert isinstance(out, tuple) and len(out) == parts
    with torch.no_grad():
        expected = block(x) - x
        torch.testing.assert_close(sum(out), expected, atol=1e-6, rtol=1e-6)
    if kind == "pre-norm":
        # Exact parts: adding them in the block's order reproduces its output bit for bit.
        assert torch.equal((x + out[0]) + out[1], block(x))
        # No residual survives in the output: the last trunk addition is dead and removed.
        adds = [n for n in gm.graph.nodes if n.target is operator.add]
        assert len(adds) == 1


def test_extract_delta_is_honest_when_run_twice() -> None:
    _, gm, _ = _capture("pre-norm")
    assert ExtractDeltaPass("x")(gm).modified
    code = gm.code
    second = ExtractDeltaPass("x")
    assert not second(gm).modified and second.delta_kind == "exact"
    assert gm.code == code


def test_user_registered_form_takes_precedence() -> None:
    _, gm, _ = _capture("pre-norm")
    form = BlockForm("two-branch", lambda a: a.decomposable and len(a.branches) == 2, "mine")
    register_block_form(form)
    try:
        assert block_forms()[0] is form
        assert analyze_residual(gm, "x").form == "two-branch"
    finally:
        unregister_block_form("two-branch")
    assert analyze_residual(gm, "x").form == "pre-norm"
