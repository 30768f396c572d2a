"""The torch custom ops: registration (opcheck), gradients, numerics and errors, on every available backend.

Backend "triton" runs the fused kernels: compiled on CUDA, in Triton's interpreter on CPU (float32 and
float16 only: the interpreter has no bfloat16).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from modify.kernels import gated_scatter_add, gather_tokens, reference, use_backend
from modify.kernels.ops import gated_scatter_add_backward, scatter_tokens

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None and (
    DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
)
BACKENDS = ["reference"] + (["triton"] if HAS_TRITON else [])
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    with use_backend(request.param):
        yield request.param


def _inputs(batch: int, length: int, k: int, dim: int, dtype: torch.dtype, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, dim, generator=gen).to(DEVICE, dtype)
    idx = torch.stack([torch.randperm(length, generator=gen)[:k].sort().values for _ in range(batch)]).to(DEVICE)
    delta = torch.randn(batch, k, dim, generator=gen).to(DEVICE, dtype)
    gate = (torch.rand(batch, k, generator=gen) * 2).to(DEVICE)
    return x, idx, delta, gate


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 24, 130])  # D need not be a power of two
def test_gather_is_exact(backend: str, dtype: torch.dtype, dim: int) -> None:
    x, idx, _, _ = _inputs(2, 11, 4, dim, dtype)
    assert torch.equal(gather_tokens(x, idx), reference.gather_tokens(x, idx))
    rows = torch.randn(2, 4, dim).to(DEVICE, dtype)
    assert torch.equal(scatter_tokens(rows, idx, 11), reference.scatter_tokens(rows, idx, 11))


def _error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return (out.double() - exact).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [24, 130])
def test_gated_scatter_add_error_is_within_twice_pytorchs(backend: str, dtype: torch.dtype, dim: int) -> None:
    x, idx, delta, gate = _inputs(3, 17, 5, dim, dtype)
    exact = x.double().scatter_add(1, idx[..., None].expand(-1, -1, dim), delta.double() * gate.double()[..., None])
    torch_same_dtype = x.scatter_add(1, idx[..., None].expand(-1, -1, dim), delta * gate.to(dtype)[..., None])
    out = gated_scatter_add(x, idx, delta, gate)
    assert _error(out, exact) <= 2 * _error(torch_same_dtype, exact)
    skipped = torch.ones(3, 17, dtype=torch.bool, device=DEVICE)
    skipped[torch.arange(3, device=DEVICE)[:, None], idx] = False
    assert torch.equal(out[skipped], x[skipped])


def test_unit_gate_adds_exactly_like_pytorch(backend: str) -> None:
    """Gate 1 must give x + delta bit for bit: capacity 1.0 reproduces the dense model through this op."""
    x, idx, delta, _ = _inputs(2, 9, 9, 40, torch.float32)
    out = gated_scatter_add(x, idx, delta, torch.ones(2, 9, device=DEVICE))
    assert torch.equal(out, x + delta)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_reference(backend: str, dtype: torch.dtype) -> None:
    x, idx, delta, gate = _inputs(2, 13, 6, 70, dtype)
    grad = torch.randn(2, 13, 70).to(DEVICE, dtype)
    grad_delta, grad_gate = gated_scatter_add_backward(grad, idx, delta, gate)
    with use_backend("reference"):
        ref_delta, ref_gate = reference.gated_scatter_add_backward(grad, idx, delta, gate)
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(grad_delta, ref_delta, atol=tol, rtol=tol)
    torch.testing.assert_close(grad_gate, ref_gate, atol=tol * 10, rtol=tol)


def test_gradcheck_float64(backend: str) -> None:
    x, idx, delta, gate = (t.double() if t.is_floating_point() else t for t in _inputs(2, 7, 3, 5, torch.float32))
    x, delta, gate = (t.requires_grad_() for t in (x, delta, gate))
    assert torch.autograd.gradcheck(lambda a, d, g: gated_scatter_add(a, idx, d, g), (x, delta, gate))
    assert torch.autograd.gradcheck(lambda a: gather_tokens(a, idx), (x,))


def test_opcheck(backend: str) -> None:
    x, idx, delta, gate = _inputs(2, 8, 3, 6, torch.float32)
    torch.library.opcheck(torch.ops.modify.gather_tokens.default, (x.requires_grad_(), idx))
    torch.library.opcheck(
        torch.ops.modify.gated_scatter_add.default,
        (x.detach().requires_grad_(), idx, delta.requires_grad_(), gate.requires_grad_()),
    )
    torch.library.opcheck(torch.ops.modify.scatter_tokens.default, (delta.detach(), idx, 8))
    torch.library.opcheck(
        torch.ops.modify.gated_scatter_add_backward.default, (x.detach(), idx, delta.detach(), gate.detach())
    )


def test_non_contiguous_inputs(backend: str) -> None:
    x, idx, delta, gate = _inputs(2, 10, 4, 12, torch.float32)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, batch-minor layout
    delta_t = delta[..., ::1].transpose(1, 2).contiguous().transpose(1, 2)
    idx_t = idx.t().contiguous().t()
    assert not x_t.is_contiguous() and not delta_t.is_contiguous() and not idx_t.is_contiguous()
    assert torch.equal(gather_tokens(x_t, idx_t), reference.gather_tokens(x, idx))
    with use_backend("reference"):
        expected = gated_scatter_add(x, idx, delta, gate)
    torch.testing.assert_close(gated_scatter_add(x_t, idx_t, delta_t, gate), expected, atol=1e-6, rtol=1e-6)


def test_bad_inputs_get_clear_errors(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x, idx, delta, gate = _inputs(2, 10, 4, 12, torch.float32)
    with pytest.raises(ValueError, match=r"idx must be \[B, k\] int64"):
        gather_tokens(x, idx.int())
    with pytest.raises(ValueError, match="delta is torch.float16 but x is torch.float32"):
        gated_scatter_add(x, idx, delta.half(), gate)
    with pytest.raises(ValueError, match=r"delta must be \[B, k, D\]"):
        gated_scatter_add(x, idx, delta[:, :2], gate)
    monkeypatch.setenv("MODIFY_DEBUG", "1")
    bad = idx.clone()
    bad[0, -1] = 10
    with pytest.raises(IndexError, match=r"token index out of range: indices span \[\d+, 10\] for a sequence of 10"):
        gather_tokens(x, bad)
    with pytest.raises(IndexError, match="out of range"):
        gated_scatter_add(x, bad, delta, gate)


def _backends_agree(model: torch.nn.Module, ids: torch.Tensor, param: torch.nn.Parameter) -> None:
    """The loss, and ``param``'s gradient (which must not be zero), through the kernels equal the reference's."""
    results = {}
    for name in ("reference", "triton"):
        model.zero_grad()
        with use_backend(name):
            loss = model(ids, labels=ids).loss
            loss.backward()
        results[name] = (loss.detach(), param.grad.clone())
    assert results["reference"][1].abs().sum() > 0
    torch.testing.assert_close(results["triton"][0], results["reference"][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(results["triton"][1], results["reference"][1], atol=1e-6, rtol=1e-4)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
def test_routed_model_through_the_triton_kernels() -> None:
    """A tiny Llama routed through the fused kernels: exact at capacity 1.0, and equal to the reference path."""
    import modify
    from modify.testing import tiny_model

    ids = torch.randint(3, 97, (2, 12)).to(DEVICE)
    model = tiny_model("llama").to(DEVICE)
    with torch.no_grad():
        dense = model(ids).logits
    modify.convert(model, capacity=1.0, layers="all")
    with use_backend("triton"), torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    modify.revert(model)

    modify.convert(model, capacity=0.25)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if "router" in n):
            p.normal_(0, 0.3)
    _backends_agree(model, ids, model.model.layers[1].mod_router.weight)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
def test_skip_paths_through_the_triton_kernels() -> None:
    """Skipped tokens gathered and scattered by the fused kernels: the loss and the path's gradient equal the
    reference path's."""
    import modify
    from modify.testing import tiny_model

    ids = torch.randint(3, 97, (2, 12)).to(DEVICE)
    model = tiny_model("llama").to(DEVICE)
    modify.convert(model, capacity=0.25, skip_path="linear", skip_rank=4)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if "router" in n or "skip_path" in n):
            p.normal_(0, 0.3)
    _backends_agree(model, ids, model.model.layers[1].mod_skip_path.down.weight)


@pytest.mark.skipif(DEVICE != "cuda" or not HAS_TRITON, reason="needs a GPU with over 9 GB free")
def test_int64_offsets_past_two_to_the_31() -> None:
    dim = 4096
    length = (1 << 31) // dim + 64  # B*T*D > 2**31 elements
    x = torch.zeros(1, length, dim, device="cuda", dtype=torch.bfloat16)
    x[0, -3:] = torch.arange(3, device="cuda", dtype=torch.bfloat16)[:, None] + 1
    idx = torch.tensor([[length - 3, length - 2, length - 1]], device="cuda")
    with use_backend("triton"):
        rows = gather_tokens(x, idx)
        assert torch.equal(rows[0, :, 0].float().cpu(), torch.tensor([1.0, 2.0, 3.0]))
        out = gated_scatter_add(x, idx, torch.ones_like(rows), torch.ones(1, 3, device="cuda"))
    assert torch.equal(out[0, -3:, 5].float().cpu(), torch.tensor([2.0, 3.0, 4.0]))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
def test_causal_generation_through_the_triton_kernels() -> None:
    """Sampling gathers a varying number of tokens per row (processed first, spare slots after: unsorted
    indices); the kernels generate the reference path's tokens, left-padded batch included."""
    import modify
    from modify.testing import tiny_model

    model = tiny_model("llama").to(DEVICE)
    modify.convert(model, capacity=0.5, layers="all", keep_first=1)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if "router" in n and n.endswith("weight")):
            p.normal_(0, 0.5)
    ids = torch.randint(3, 97, (2, 9)).to(DEVICE)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    tokens = {}
    for name in ("reference", "triton"):
        with use_backend(name):
            tokens[name] = model.generate(ids, **kwargs)
    assert torch.equal(tokens["triton"], tokens["reference"])
