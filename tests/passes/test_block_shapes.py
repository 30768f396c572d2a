"""Block shapes beyond the common ones: a residual added inside a child, tuple-concatenated outputs, children
whose outputs differ between instances of one class, dict arguments, hybrid and multimodal stacks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import modify
from modify import UnsupportedModelError
from modify.passes import capture_delta, find_block_stack, probe_block_calls
from modify.testing.matrix import build


class _AddsResidual(nn.Module):
    """``dense(h) + residual`` inside the module (BLOOM's attention and MLP)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return residual + self.dense(h)


class _MaybeBias(nn.Module):
    """Returns ``(out, bias)`` with a bias in some instances and None in the others (GPT-NeoX-Japanese)."""

    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim, bias=False)
        self.bias = nn.Parameter(torch.randn(dim)) if bias else None

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.dense(h), self.bias


class _Block(nn.Module):
    def __init__(self, dim: int, kind: str, index: int) -> None:
        super().__init__()
        self.kind = kind
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _AddsResidual(dim) if kind == "inside" else _MaybeBias(dim, bias=index == 1)
        self.mlp = _AddsResidual(dim) if kind == "inside" else nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, masks: dict[str, Any] | None = None) -> Any:
        if self.kind == "inside":
            h = self.attn(self.norm1(x), x)
            return (self.mlp(self.norm2(h), h),) + (masks["causal"] if masks else None,)
        out, bias = self.attn(self.norm1(x))
        if bias is not None:
            out = out + bias
        h = self.norm2(x + out)  # post-norm, returning a list concatenated with the rest
        return [h + self.mlp(h)] + [None]


class _Model(nn.Module):
    def __init__(self, kind: str, dim: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block(dim, kind, i) for i in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        masks = {"causal": torch.ones(x.shape[0], length, length, dtype=torch.bool).tril()}
        for layer in self.layers:
            x = layer(x, masks=masks)[0]
        return x


def _inputs(length: int) -> dict[str, Any]:
    return {"x": torch.randn(2, length, 8, generator=torch.Generator().manual_seed(length))}


def test_a_residual_added_inside_a_child_is_found_and_delta_is_exact() -> None:
    model = _Model("inside").eval()
    blocks = list(model.layers)
    spec = probe_block_calls(model, blocks, _inputs)[0]
    assert spec.token_dims[("masks", "causal")] == (1, 2)  # a dict argument's tensors are gathered too
    _, extract, inline = capture_delta(blocks[0], spec)
    assert inline == ("attn", "mlp") and extract.delta_kind == "exact"
    x = _inputs(9)["x"]
    with torch.no_grad():
        dense = model(x)
        modify.convert(model, capacity=1.0, layers="all", example_inputs=_inputs)
        assert torch.equal(model(x), dense)
        modify.revert(model)
        modify.convert(model, capacity=0.5, layers="all", example_inputs=_inputs)
        assert model(x).shape == dense.shape


def test_instances_whose_children_return_none_differently_each_get_their_own_graph() -> None:
    """One class, a bias in block 1 only, a post-norm block returning ``[h] + [None]``: capacity 1.0 is exact
    in every block (a shared trace would take block 1's ``if bias is not None`` branch everywhere)."""
    model = _Model("bias").eval()
    x = _inputs(9)["x"]
    with torch.no_grad():
        dense = model(x)
        modify.convert(model, capacity=1.0, layers="all", example_inputs=_inputs)
        torch.testing.assert_close(model(x), dense, atol=1e-5, rtol=0)
    assert [b.form for b in modify.find_blocks(model, _inputs)] == ["post-norm"] * 3


def test_the_language_models_stack_is_chosen_in_multimodal_models() -> None:
    assert find_block_stack(build("got_ocr2"))[0] == "model.language_model.layers"  # vision tower beside it
    assert find_block_stack(build("phi4_multimodal"))[0] == "model.layers"  # vision and audio encoders beside it


def test_hybrid_stacks_of_several_block_classes_are_found() -> None:
    name, stack = find_block_stack(build("jamba"))
    assert name == "model.layers" and len({type(b) for b in stack}) == 2


def test_families_modify_cannot_route_say_why() -> None:
    with pytest.raises(UnsupportedModelError, match="ALiBi"):
        modify.convert(build("mpt"))
    with pytest.raises(UnsupportedModelError, match="second stream"):
        modify.convert(build("zaya"))
