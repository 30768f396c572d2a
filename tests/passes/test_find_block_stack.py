from __future__ import annotations

import pytest
from torch import nn

from modify import UnsupportedModelError
from modify.passes import find_block_stack
from modify.testing import tiny_model
from tests.helpers import ToyModel


@pytest.mark.parametrize(
    "family,expected",
    [
        ("llama", "model.layers"),
        ("gpt2", "transformer.h"),
        ("gpt_neox", "gpt_neox.layers"),
        ("opt", "model.decoder.layers"),
    ],
)
def test_finds_hugging_face_stacks(family: str, expected: str) -> None:
    name, stack = find_block_stack(tiny_model(family))
    assert name == expected and len(stack) == 4


def test_searches_models_without_a_hint() -> None:
    """The largest list of identical blocks wins over smaller ones (here a list of heads)."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
            self.body = ToyModel("pre-norm")

    name, stack = find_block_stack(Model())
    assert name == "body.layers" and len(stack) == 3


def test_no_stack_is_an_unsupported_model() -> None:
    with pytest.raises(UnsupportedModelError, match=r"cannot route module 'Sequential': no nn.ModuleList"):
        find_block_stack(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
