"""Regression tests for the bugs found in other Mixture-of-Depths code (see the prior-art notes).

Each routed block is compared with a slow loop reference written from the paper's definition:
per sequence, the k = ceil(c·T) tokens with the highest router scores, in positional order, go through
the *original* block with their original positions and a causal mask among themselves, and
x + 2σ(r)·(block(x_sel) - x_sel) is written back; every other token is left as it was.
"""

from __future__ import annotations

import math

import pytest
import torch

import modify
from modify.routing import capacity_tokens
from modify.testing import tiny_model
from tests.helpers import BlockIO, Recorder, open_gates, set_router_weights


def _loop_reference(model: torch.nn.Module, block: torch.nn.Module, x: torch.Tensor, capacity: float) -> torch.Tensor:
    router = block.mod_router
    scores = torch.nn.functional.linear(x.float(), router.weight.float(), router.bias.float()).squeeze(-1)
    batch, length, _ = x.shape
    k = math.ceil(capacity * length)
    y = x.clone()
    for b in range(batch):
        ranked = sorted(range(length), key=lambda t: -float(scores[b, t]))
        sel = sorted(ranked[:k])
        xs = x[b, sel].unsqueeze(0)
        pos = torch.tensor(sel).unsqueeze(0)
        cos_sin = model.model.rotary_emb(xs, pos)
        causal = torch.full((k, k), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)[None, None]
        out = type(block).forward(block, xs, attention_mask=causal, position_ids=pos, position_embeddings=cos_sin)
        gate = 2 * torch.sigmoid(router.scale.float() * scores[b, sel]).to(x.dtype).unsqueeze(-1)
        y[b, sel] = x[b, sel] + gate * (out[0] - x[b, sel])
    return y


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("capacity", [0.125, 0.3, 0.5])
def test_routed_block_matches_loop_reference(family: str, capacity: float) -> None:
    """Catches: residual added twice, router gate missing, unsorted indices, renumbered positions, k-1 tokens."""
    model = tiny_model(family).double()
    modify.convert(model, capacity=capacity, layers=[1])
    set_router_weights(model)
    block = model.model.layers[1]
    io = BlockIO(block)
    with torch.no_grad():
        model(torch.randint(3, 97, (2, 24)))
        expected = _loop_reference(model, block, io.x, capacity)
    io.remove()
    torch.testing.assert_close(io.y, expected, atol=1e-10, rtol=1e-10)


def _attention_calls(model: torch.nn.Module, capacity: float, length: int = 16) -> tuple[torch.Tensor, dict]:
    modify.convert(model, capacity=capacity, layers=[1])
    set_router_weights(model)
    rec = Recorder(model.model.layers[1].self_attn)
    scores: dict[str, torch.Tensor] = {}
    hook = model.model.layers[1].mod_router.register_forward_hook(lambda m, a, out: scores.__setitem__("r", out))
    with torch.no_grad():
        model(torch.randint(3, 97, (2, length)))
    rec.remove()
    hook.remove()
    return scores["r"], rec.calls[0][1]


def test_indices_are_sorted_back_to_positional_order() -> None:
    _, kwargs = _attention_calls(tiny_model("llama"), 0.5)
    positions = kwargs["position_ids"]
    assert (positions[:, 1:] > positions[:, :-1]).all()


def test_positions_are_gathered_not_renumbered() -> None:
    model = tiny_model("llama")
    scores, kwargs = _attention_calls(model, 0.25)
    k = capacity_tokens(0.25, 16)
    expected = scores.topk(k, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(kwargs["position_ids"], expected)
    assert not torch.equal(kwargs["position_ids"][0], torch.arange(k))
    cos, _ = kwargs["position_embeddings"]
    full_cos, _ = model.model.rotary_emb(torch.zeros(1, 16, 32), torch.arange(16)[None])
    torch.testing.assert_close(cos, full_cos[0][expected], atol=0, rtol=0)


@pytest.mark.parametrize(
    "capacity,length,k", [(0.125, 16, 2), (0.25, 16, 4), (0.3, 10, 3), (0.5, 7, 4), (1 / 3, 9, 3), (0.01, 5, 1)]
)
def test_exactly_k_tokens_are_computed(capacity: float, length: int, k: int) -> None:
    """Not k-1 (selection by ``> kth value``), not every token computed and masked afterwards."""
    assert capacity_tokens(capacity, length) == k
    model = tiny_model("llama")
    modify.convert(model, capacity=capacity, layers=[1])
    set_router_weights(model)
    rec = Recorder(model.model.layers[1].mlp)
    with torch.no_grad():
        model(torch.randint(3, 97, (2, length)))
    rec.remove()
    assert rec.calls[0][0][0].shape[:2] == (2, k)


def test_skipped_tokens_ride_the_residual_stream_unchanged() -> None:
    model = tiny_model("gpt2")
    modify.convert(model, capacity=0.25, layers=[1])
    set_router_weights(model)
    io = BlockIO(model.transformer.h[1])
    with torch.no_grad():
        model(torch.randint(3, 97, (2, 16)))
    io.remove()
    unchanged = (io.y == io.x).all(dim=-1)
    assert unchanged.sum(dim=-1).tolist() == [16 - 4, 16 - 4]


def test_router_is_on_the_gradient_path() -> None:
    model = tiny_model("llama")
    modify.convert(model, capacity=0.5, layers=[1])
    open_gates(model)
    ids = torch.randint(3, 97, (2, 16))
    loss = model(ids, labels=ids).loss
    loss.backward()
    router = model.model.layers[1].mod_router
    assert router.weight.grad.abs().sum() > 0 and router.bias.grad.abs().sum() > 0
    # ...and the gate really scales the block: moving the router's bias moves the output.
    with torch.no_grad():
        before = model(ids).logits
        router.bias.fill_(1.0)
        assert not torch.allclose(model(ids).logits, before)


def test_keep_first_always_routes_the_first_real_token() -> None:
    """The attention sink stays in every routed block, even when the router scores it lowest."""
    from modify.routing import select_tokens

    scores = torch.tensor([[-9.0, 1.0, 2.0, 3.0, 0.5], [5.0, -9.0, 1.0, 2.0, 3.0]])
    padding = torch.tensor([[False] * 5, [True, False, False, False, False]])
    assert select_tokens(scores, 2, padding).tolist() == [[2, 3], [3, 4]]
    assert select_tokens(scores, 2, padding, keep_first=1).tolist() == [[0, 3], [1, 4]]
    model = tiny_model("llama")
    modify.convert(model, capacity=0.25, layers=[1], keep_first=1)
    set_router_weights(model)
    rec = Recorder(model.model.layers[1].self_attn)
    with torch.no_grad():
        model(torch.randint(3, 97, (2, 16)))
    rec.remove()
    assert (rec.calls[0][1]["position_ids"][:, 0] == 0).all()
    assert model.config.mixture_of_depths["keep_first"] == 1


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mixed_precision_autocast(family: str) -> None:
    """Under torch.autocast (float32 weights, bfloat16 compute: how Trainer(bf16=True) runs), the block's Δ is
    bfloat16 while the residual stream stays float32. Capacity 1.0 must still equal the dense model exactly,
    routing must run forward and backward, and the router must still score in float32 (bfloat16 scores tie).
    """
    model = tiny_model(family)
    ids = torch.randint(3, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        dense = model(ids).logits
    modify.convert(model, capacity=1.0, layers="all")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    modify.revert(model)
    modify.convert(model, capacity=0.5, layers=[1])
    set_router_weights(model)
    router = model.get_submodule(modify.find_blocks(model)[1].name).mod_router
    scores = []
    handle = router.register_forward_hook(lambda m, a, out: scores.append(out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    handle.remove()
    assert scores[0].dtype == torch.float32
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
