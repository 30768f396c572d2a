"""Every supported family: identity at capacity 1.0, the paper's plan trains, revert is exact."""

from __future__ import annotations

import math

import pytest
import torch

import modify
from modify.archs import TESTED_FAMILIES
from modify.testing import FAMILIES, tiny_model

VARIANTS = [(f, {}) for f in FAMILIES] + [
    ("opt", {"do_layer_norm_before": False}),  # post-norm: Δ = block(x) - x
    ("gpt_neox", {"use_parallel_residual": False}),
]


def _ids(batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(7))


def _name(family: str, overrides: dict) -> str:
    return family + ("-" + "-".join(overrides) if overrides else "")


# transformers has no SDPA path for Gemma2 (soft-capped attention).
WITH_ATTN = [(f, o, a) for f, o in VARIANTS for a in ("eager", "sdpa") if not (f == "gemma2" and a == "sdpa")]


@pytest.mark.parametrize("family,overrides,attn", WITH_ATTN, ids=[f"{_name(f, o)}-{a}" for f, o, a in WITH_ATTN])
def test_capacity_one_reproduces_the_model(family: str, overrides: dict, attn: str) -> None:
    model = tiny_model(family, attn_implementation=attn, **overrides)
    ids = _ids()
    with torch.no_grad():
        reference = model(ids).logits
        modify.convert(model, capacity=1.0, layers="all")
        converted = model(ids).logits
    blocks = modify.find_blocks(model)
    assert all(b.routed and b.capacity == 1.0 for b in blocks)
    torch.testing.assert_close(converted, reference, atol=1e-4, rtol=0)
    if all(b.delta == "exact" for b in blocks):
        # Δ's parts are added in the block's own order, so the float operations are the dense model's.
        assert torch.equal(converted, reference)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forms_match_the_support_table(family: str) -> None:
    forms = {b.form for b in modify.find_blocks(tiny_model(family))}
    assert forms == {TESTED_FAMILIES[family]}


@pytest.mark.parametrize("family,overrides", VARIANTS, ids=[_name(f, o) for f, o in VARIANTS])
def test_paper_plan_trains_and_reverts(family: str, overrides: dict) -> None:
    model = tiny_model(family, **overrides)
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    modify.convert(model, capacity=0.125, layers="every-other")
    routed_names = {b.index for b in modify.find_blocks(model) if b.routed}
    assert routed_names == set(range(1, 4, 2))
    model.train()
    out = model(ids, labels=ids)
    assert torch.isfinite(out.logits).all()
    out.loss.backward()
    routers = {n: p for n, p in model.named_parameters() if "router" in n}
    assert len(routers) == 3 * len(routed_names)
    # A fresh router's gate scale is 0 (every gate exactly 1): the scale gets gradient first, through its
    # random scores; weights and bias once it has moved.
    for name, p in routers.items():
        if name.endswith("scale"):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"router {name} got no gradient"
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optim.step()
    optim.zero_grad()
    model(ids, labels=ids).loss.backward()
    for name, p in routers.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"router {name} got no gradient after one step"
    before = {n: p.detach().clone() for n, p in routers.items()}
    optim.step()
    assert all(not torch.equal(before[n], p) for n, p in routers.items())
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()

    # Revert after training the routers only: the original weights and function come back exactly.
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in weights:
                v.copy_(weights[k])
    modify.revert(model)
    assert not any("router" in n for n, _ in model.named_parameters())
    assert set(model.state_dict()) == set(weights)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    assert not hasattr(model.config, "mixture_of_depths")


def test_routing_disabled_runs_dense() -> None:
    model = tiny_model("llama")
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
        modify.convert(model, capacity=0.25, layers="all")
        routed = model(ids).logits
        with modify.routing_disabled(model):
            assert torch.equal(model(ids).logits, dense)
        assert torch.equal(model(ids).logits, routed)
    assert not torch.equal(routed, dense)


def test_generate_runs_after_conversion() -> None:
    """A plain forward with the default cache and greedy generation don't crash on a routed model."""
    model = tiny_model("llama")
    modify.convert(model, capacity=0.5)
    ids = _ids(1, 8)
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_capacity_per_block_and_k() -> None:
    model = tiny_model("qwen2")
    modify.convert(model, capacity=[0.5, 0.25], layers=[0, 2])
    info = {b.index: b.capacity for b in modify.find_blocks(model)}
    assert info == {0: 0.5, 1: None, 2: 0.25, 3: None}
    assert model.config.mixture_of_depths["capacities"] == [0.5, 0.25]
    assert math.isclose(modify.flops(model, 64).ratio, modify.flops(model, 64).routed / modify.flops(model, 64).dense)
