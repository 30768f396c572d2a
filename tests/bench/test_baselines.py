"""The benchmark's baselines compute what the converted model computes (only the way differs), so the comparison
is fair: same outputs in float64, on families with different block calls, with padding."""

from __future__ import annotations

import pytest
import torch

import modify
from modify.bench.baselines import IMPLEMENTATIONS, implementation
from modify.testing import tiny_model
from tests.helpers import set_router_weights


def _outputs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    outs = {}
    with torch.no_grad():
        for name in IMPLEMENTATIONS:
            with implementation(model, name):
                outs[name] = model(ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
    return outs


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi", "gemma2"])
def test_baselines_route_as_the_converted_model(family: str) -> None:
    """per-sample computes what the converted model computes; masked too at capacity 1.0 (below it, its routed
    tokens attend to every token, the skipped ones included: the usual masked code's semantics)."""
    ids = torch.randint(3, 90, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on one row
    for capacity in (1.0, 0.25):
        model = modify.convert(tiny_model(family), capacity=capacity, layers="every-other")
        set_router_weights(model)
        outs = _outputs(model, ids, mask)
        torch.testing.assert_close(outs["per-sample"], outs["converted"], atol=1e-5, rtol=1e-5)
        if capacity == 1.0:
            torch.testing.assert_close(outs["masked"], outs["converted"], atol=1e-5, rtol=1e-5)
        else:
            assert not torch.allclose(outs["dense"], outs["converted"], atol=1e-3)
            assert not torch.allclose(outs["masked"], outs["converted"], atol=1e-3)
        # the swap is undone: the model routes as before
        with torch.no_grad():
            again = model(ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
        torch.testing.assert_close(again, outs["converted"], atol=0, rtol=0)


def test_masked_baseline_runs_every_token_and_per_sample_loops_rows() -> None:
    model = modify.convert(tiny_model("llama"), capacity=0.25, layers=[1])
    block = model.model.layers[1]
    seen: list[int] = []
    handle = block.mlp.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[:2]))
    ids = torch.randint(3, 90, (2, 16))
    with torch.no_grad():
        for name in ("converted", "masked", "per-sample"):
            with implementation(model, name):
                model(ids, use_cache=False)
    handle.remove()
    assert seen == [(2, 4), (2, 16), (1, 4), (1, 4)]
