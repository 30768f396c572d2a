"""Routers stay float32 whatever the model's dtype: after .to(bfloat16), .half(), .bfloat16() and a reload."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import modify
from modify.io.checkpoint import Source, save_converted
from modify.testing import tiny_model
from tests.helpers import set_router_weights


def _converted() -> nn.Module:
    model = modify.convert(tiny_model("llama"), capacity=0.5, layers="all")
    set_router_weights(model)  # values that bfloat16 can't hold exactly
    return model


def _routers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "router" in n}


def _check_dtypes(model: nn.Module, dtype: torch.dtype) -> None:
    params = dict(model.named_parameters())
    routers = _routers(model)
    assert len(routers) == 12  # weight, bias and scale of 4 routed blocks
    assert {n: p.dtype for n, p in routers.items()} == dict.fromkeys(routers, torch.float32)
    others = {n: p.dtype for n, p in params.items() if n not in routers}
    assert others and set(others.values()) == {dtype}


@pytest.mark.parametrize(
    "cast,dtype",
    [
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.bfloat16(), torch.bfloat16),
        (lambda m: m.half(), torch.float16),
        (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16),
    ],
    ids=["to-bfloat16", "bfloat16", "half", "to-device-and-dtype"],
)
def test_routers_stay_float32_after_a_cast(cast: Callable[[nn.Module], nn.Module], dtype: torch.dtype) -> None:
    model = _converted()
    before = {n: p.detach().clone() for n, p in _routers(model).items()}
    identity = {n: id(p) for n, p in _routers(model).items()}
    model = cast(model)
    _check_dtypes(model, dtype)
    after = _routers(model)
    # The float32 values themselves are kept (not rounded through the low precision and back), and the
    # Parameter objects too: an optimizer built before the cast still holds them.
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert {n: id(p) for n, p in after.items()} == identity
    logits = model(torch.randint(3, 97, (2, 16))).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert modify.find_blocks(model)[0].routed


def test_gradients_and_device_moves() -> None:
    """Router gradients stay float32 too; a device move still moves the routers."""
    model = _converted()
    model(torch.randint(3, 97, (2, 16)), labels=torch.randint(3, 97, (2, 16))).loss.backward()
    model.to(torch.bfloat16)
    grads = {n: p.grad for n, p in _routers(model).items()}
    assert all(g is not None and g.dtype == torch.float32 for g in grads.values())
    model.to("meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in _routers(model).values()} == {torch.float32}


def test_routers_stay_float32_when_reloaded_in_bfloat16(tmp_path: Path) -> None:
    model = _converted().to(torch.bfloat16)
    routers = {n: p.detach().clone() for n, p in _routers(model).items()}
    out = save_converted(model, None, tmp_path / "out", Source("directory", tmp_path))
    loaded = modify.from_pretrained(out, dtype=torch.bfloat16)
    _check_dtypes(loaded, torch.bfloat16)
    assert all(torch.equal(p, routers[n]) for n, p in _routers(loaded).items())
    assert torch.isfinite(loaded(torch.randint(3, 97, (1, 16))).logits).all()
