"""The public API's contract: names, errors that change nothing, the plan in the config, custom models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import modify
from modify import MoDConfig, UnsupportedModelError
from modify.testing import tiny_model
from tests.helpers import ToyModel, open_gates, toy_inputs


def _snapshot(model: nn.Module) -> tuple[dict, str]:
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_json_string()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"capacity": -0.5}, r"capacity -0.5 is out of range: it must be in \[0, 1\] \(0 removes a block\)"),
        ({"capacity": 1.5}, r"capacity 1.5 is out of range"),
        ({"capacity": float("nan")}, r"capacity nan is out of range"),
        ({"capacity": [0.5]}, r"got 1 capacities for 2 routed blocks"),
        ({"layers": [0, 4]}, r"block index 4 is out of range: valid indices are 0..3"),
        ({"layers": [-1]}, r"block index -1 is out of range"),
        ({"layers": []}, r"layers is empty"),
        ({"layers": "odd"}, r"unknown layers 'odd'"),
    ],
)
def test_bad_arguments_raise_and_change_nothing(kwargs: dict, message: str) -> None:
    model = tiny_model("llama")
    state, config = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        modify.convert(model, **kwargs)
    assert model.config.to_json_string() == config
    assert set(model.state_dict()) == set(state)
    assert not any(m.forward.__func__ is not type(m).forward for m in model.modules() if hasattr(m.forward, "__func__"))


def test_unsupported_block_raises_before_any_change() -> None:
    model = ToyModel("no-residual")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedModelError, match=r"cannot route module 'layers.0': .*residual"):
        modify.convert(model, layers="all", example_inputs=toy_inputs)
    assert set(model.state_dict()) == set(before)
    assert not any("router" in n for n, _ in model.named_parameters())


def test_model_without_block_stack() -> None:
    with pytest.raises(UnsupportedModelError, match="no nn.ModuleList of two or more blocks"):
        modify.convert(nn.Sequential(nn.Linear(4, 4)))


def test_converting_twice_is_an_explicit_error() -> None:
    model = modify.convert(tiny_model("gpt2"))
    with pytest.raises(ValueError, match=r"already converted; call modify.revert\(model\) first"):
        modify.convert(model, capacity=0.5)


def test_plan_lives_in_the_config_and_round_trips() -> None:
    model = modify.convert(tiny_model("llama"), capacity=0.25)
    saved = json.loads(model.config.to_json_string())["mixture_of_depths"]
    plan = MoDConfig.from_dict(saved)
    assert plan.routed == [1, 3] and plan.capacities == [0.25, 0.25]
    assert plan.block_stack == "model.layers" and plan.num_blocks == 4 and plan.version == 2
    assert plan.gate == "sigmoid" and plan.router == "linear"


def test_config_validation_names_the_fix() -> None:
    with pytest.raises(ValueError, match="version 9 is newer"):
        MoDConfig(num_blocks=2, version=9)
    with pytest.raises(ValueError, match="unique and ascending"):
        MoDConfig(num_blocks=4, routed=[2, 1], capacities=[0.5, 0.5])
    with pytest.raises(ValueError, match="unknown MoDConfig keys"):
        MoDConfig.from_dict({"num_blocks": 2, "colour": "red"})


def test_router_parameters_are_named_and_float32() -> None:
    model = modify.convert(tiny_model("phi").to(torch.bfloat16), capacity=0.5)
    routers = [(n, p) for n, p in model.named_parameters() if "router" in n]
    assert [n for n, _ in routers] == [
        "model.layers.1.mod_router.weight",
        "model.layers.1.mod_router.bias",
        "model.layers.1.mod_router.scale",
        "model.layers.3.mod_router.weight",
        "model.layers.3.mod_router.bias",
        "model.layers.3.mod_router.scale",
    ]
    assert all(p.dtype == torch.float32 for _, p in routers)
    logits = model(torch.randint(3, 97, (1, 12))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_custom_model_with_example_inputs() -> None:
    """Any model with a stack of residual blocks converts; example_inputs tells how to call it."""
    model = ToyModel("pre-norm").eval()
    x = toy_inputs(10)["x"]
    with torch.no_grad():
        dense = model(x)
        modify.convert(model, capacity=1.0, layers="all", example_inputs=toy_inputs)
        assert torch.equal(model(x), dense)
    infos = modify.find_blocks(model, example_inputs=toy_inputs)
    assert [(b.name, b.form, b.routed) for b in infos] == [(f"layers.{i}", "pre-norm", True) for i in range(3)]


def test_find_blocks_on_an_unconverted_model_changes_nothing() -> None:
    model = tiny_model("opt")
    infos = modify.find_blocks(model)
    assert [(b.index, b.name, b.form, b.delta, b.routed, b.capacity) for b in infos] == [
        (i, f"model.decoder.layers.{i}", "pre-norm", "exact", False, None) for i in range(4)
    ]
    assert not any("router" in n for n, _ in model.named_parameters())


def test_deepcopy_of_a_converted_model() -> None:
    model = modify.convert(tiny_model("llama"), capacity=0.5)
    twin = copy.deepcopy(model)
    ids = torch.randint(3, 97, (2, 10))
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, model(ids).logits)
    modify.revert(twin)
    assert any("router" in n for n, _ in model.named_parameters())


def test_flex_attention_is_refused_with_the_fix() -> None:
    model = tiny_model("llama", attn_implementation="flex_attention")
    with pytest.raises(UnsupportedModelError, match="BlockMask .* attn_implementation='sdpa' or 'eager'"):
        modify.convert(model)


def test_gradient_checkpointing_keeps_the_router_on_the_gradient_path() -> None:
    model = modify.convert(tiny_model("llama"), capacity=0.5)
    open_gates(model)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    ids = torch.randint(3, 97, (2, 16))
    model(ids, labels=ids, use_cache=False).loss.backward()
    assert model.model.layers[1].mod_router.weight.grad.abs().sum() > 0
