"""Padding never changes real tokens: with left or right padding, the content of pad positions is invisible."""

from __future__ import annotations

import pytest
import torch

import modify
from modify.routing import capacity_tokens
from modify.testing import tiny_model
from tests.helpers import Recorder, set_router_weights

CASES = [
    (f, a)
    for f in ("llama", "mistral", "qwen2", "gemma2", "gpt2", "opt", "phi", "gpt_neox")
    for a in ("eager", "sdpa")
    if (f, a) != ("gemma2", "sdpa")
]
PAD = 5


def _batch(pad_ids: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 left-padded, row 1 right-padded, PAD pad tokens each; pad positions hold ``pad_ids``."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 97, (2, 20), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :PAD] = 0
    mask[1, -PAD:] = 0
    ids = ids.masked_fill(mask == 0, pad_ids)
    return ids, mask


@pytest.mark.parametrize("family,attn", CASES, ids=[f"{f}-{a}" for f, a in CASES])
@pytest.mark.parametrize("capacity", [0.25, 0.9])
def test_pad_content_does_not_reach_real_tokens(family: str, attn: str, capacity: float) -> None:
    model = tiny_model(family, attn_implementation=attn)
    modify.convert(model, capacity=capacity, layers="all")
    set_router_weights(model)
    real = torch.ones(2, 20, dtype=torch.bool)
    real[0, :PAD] = False
    real[1, -PAD:] = False
    with torch.no_grad():
        ids_a, mask = _batch(pad_ids=4)
        ids_b, _ = _batch(pad_ids=90)
        a = model(ids_a, attention_mask=mask).logits
        b = model(ids_b, attention_mask=mask).logits
    assert not torch.equal(ids_a, ids_b)
    torch.testing.assert_close(a[real], b[real], atol=1e-6, rtol=1e-6)


def test_padding_is_never_selected_while_real_tokens_remain() -> None:
    model = tiny_model("llama")
    modify.convert(model, capacity=0.5, layers=[1])
    set_router_weights(model, std=10.0)
    rec = Recorder(model.model.layers[1].self_attn)
    ids, mask = _batch(pad_ids=4)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    rec.remove()
    positions = rec.calls[0][1]["position_ids"]
    k = capacity_tokens(0.5, 20)
    assert positions.shape == (2, k)
    assert not (positions[0] < PAD).any()
    assert not (positions[1] >= 20 - PAD).any()
