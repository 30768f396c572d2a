"""The reference routing ops against loops written from their definitions."""

from __future__ import annotations

import torch

from modify.kernels import gated_scatter_add, gather_token_dim, gather_tokens


def _idx(batch: int, length: int, k: int) -> torch.Tensor:
    return torch.stack([torch.randperm(length)[:k].sort().values for _ in range(batch)])


def test_gather_tokens_is_exact() -> None:
    x = torch.randn(3, 11, 5)
    idx = _idx(3, 11, 4)
    out = gather_tokens(x, idx)
    for b in range(3):
        for j in range(4):
            assert torch.equal(out[b, j], x[b, idx[b, j]])


def test_gated_scatter_add_against_float64_loop() -> None:
    x = torch.randn(2, 9, 6)
    idx = _idx(2, 9, 3)
    delta = torch.randn(2, 3, 6)
    gate = torch.rand(2, 3) * 2
    out = gated_scatter_add(x, idx, delta, gate)
    expected = x.double().clone()
    for b in range(2):
        for j in range(3):
            expected[b, idx[b, j]] += gate[b, j].double() * delta[b, j].double()
    # One rounding of the product and one of the sum: within two float32 ulps of the float64 result.
    torch.testing.assert_close(out.double(), expected, atol=0, rtol=2 * torch.finfo(torch.float32).eps)
    untouched = torch.ones(2, 9, dtype=torch.bool)
    untouched[torch.arange(2)[:, None], idx] = False
    assert torch.equal(out[untouched], x[untouched])


def test_gated_scatter_add_gradients() -> None:
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(2, 2, dtype=torch.float64, requires_grad=True)
    idx = _idx(2, 7, 2)
    assert torch.autograd.gradcheck(lambda a, d, g: gated_scatter_add(a, idx, d, g), (x, delta, gate))
    assert torch.autograd.gradcheck(lambda a: gather_tokens(a, idx), (x,))


def test_gather_token_dim_broadcasts_batch_and_gathers_pairs() -> None:
    idx = _idx(2, 6, 3)
    table = torch.randn(1, 6, 4)  # a rotary table shared by the batch
    out = gather_token_dim(table, idx, 1)
    assert out.shape == (2, 3, 4)
    assert torch.equal(out[1], table[0, idx[1]])
    mask = torch.randn(2, 1, 6, 6)
    pairs = gather_token_dim(gather_token_dim(mask, idx, 2), idx, 3)
    assert torch.equal(pairs[0, 0], mask[0, 0][idx[0]][:, idx[0]])
