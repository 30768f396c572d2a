"""Triton kernels that add the gated block contribution back into the residual stream.

Forward, ``out = x`` with ``out[b, idx[b, j]] += gate[b, j] * delta[b, j]``, in one pass: each program
writes one block of one row of ``out``; a row that was routed reads its ``delta`` row through the inverse
map ``inv[b, t] = j`` (or -1). Copy and add are fused: no clone, gather, multiply and scatter_add
sequence. The arithmetic is done in float32 (float64 for float64 inputs) and rounded once, so with
gate = 1 the result is exactly PyTorch's ``x + delta``. With ``HAS_X = False`` and ``HAS_GATE = False`` the same
kernel is the adjoint of the gather: rows placed at ``idx``, zeros elsewhere.

Backward: ``grad_x = grad_out`` (no kernel); one program per routed row computes
``grad_delta = gate * grad_out[idx]`` and ``grad_gate = Σ_D grad_out[idx] * delta`` in a loop over D, reading
each ``grad_out`` row once.

The reference is :mod:`modify.kernels.reference`; the torch ops that dispatch here are in
:mod:`modify.kernels.ops`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from modify.kernels.gather_tokens import BLOCK_D_MAX

__all__ = ["gated_scatter_add_triton", "scatter_tokens_triton", "gated_scatter_add_backward_triton", "inverse_index"]


@triton.jit
def _gated_scatter_add_kernel(
    # pointers
    x_ptr,  # [B, T, D] residual stream (read only when HAS_X)
    inv_ptr,  # [B, T] int32: the j with idx[b, j] == t, or -1 for a skipped token
    delta_ptr,  # [B, K, D] contributions of the routed tokens
    gate_ptr,  # [B, K] gates (read only when HAS_GATE)
    out_ptr,  # [B, T, D] result
    # sizes
    T,  # tokens per sequence
    D,  # features per token
    # strides, in elements
    stride_xb, stride_xt, stride_xd,
    stride_vb, stride_vt,
    stride_db, stride_dk, stride_dd,
    stride_gb, stride_gk,
    stride_ob, stride_ot, stride_od,
    # meta
    HAS_X: tl.constexpr,  # add to x (forward) or to zeros (the gather's adjoint)
    HAS_GATE: tl.constexpr,  # scale delta by the gate
    ACC: tl.constexpr,  # accumulation dtype: float32, or float64 for float64 inputs
    BLOCK_D: tl.constexpr,  # features per program (power of two)
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    j = tl.load(inv_ptr + b * stride_vb + t * stride_vt).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_row = offs < D
    jv = j + tl.zeros([BLOCK_D], dtype=tl.int64)
    routed = in_row & (jv >= 0)
    if HAS_X:
        acc = tl.load(x_ptr + b * stride_xb + t * stride_xt + offs * stride_xd, mask=in_row, other=0.0).to(ACC)
    else:
        acc = tl.zeros([BLOCK_D], dtype=ACC)
    d = tl.load(delta_ptr + b * stride_db + jv * stride_dk + offs * stride_dd, mask=routed, other=0.0).to(ACC)
    if HAS_GATE:
        g = tl.load(gate_ptr + b * stride_gb + jv * stride_gk, mask=routed, other=0.0).to(ACC)
        d = g * d
    acc = acc + d
    tl.store(out_ptr + b * stride_ob + t * stride_ot + offs * stride_od, acc.to(out_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _gated_scatter_add_bwd_kernel(
    # pointers
    grad_out_ptr,  # [B, T, D] gradient of the forward's output
    idx_ptr,  # [B, K] int64 routed positions
    delta_ptr,  # [B, K, D] forward's delta
    gate_ptr,  # [B, K] forward's gate
    grad_delta_ptr,  # [B, K, D] out: gate * grad_out[idx]
    grad_gate_ptr,  # [B, K] out: sum over D of grad_out[idx] * delta
    # sizes
    T,  # tokens per sequence
    K,  # routed tokens per sequence
    D,  # features per token
    # strides, in elements
    stride_ob, stride_ot, stride_od,
    stride_ib, stride_ik,
    stride_db, stride_dk, stride_dd,
    stride_gb, stride_gk,
    stride_eb, stride_ek, stride_ed,
    stride_hb, stride_hk,
    # meta
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_D: tl.constexpr,  # features per loop step (power of two)
):
    row = tl.program_id(0).to(tl.int64)
    b = row // K
    j = row % K
    t = tl.load(idx_ptr + b * stride_ib + j * stride_ik).to(tl.int64)
    tv = t + tl.zeros([BLOCK_D], dtype=tl.int64)
    g = tl.load(gate_ptr + b * stride_gb + j * stride_gk).to(ACC)
    dot = tl.zeros([BLOCK_D], dtype=ACC)
    for start in range(0, D, BLOCK_D):
        offs = start + tl.arange(0, BLOCK_D).to(tl.int64)
        in_row = offs < D
        valid = in_row & (tv >= 0) & (tv < T)
        go = tl.load(grad_out_ptr + b * stride_ob + tv * stride_ot + offs * stride_od, mask=valid, other=0.0).to(ACC)
        d = tl.load(delta_ptr + b * stride_db + j * stride_dk + offs * stride_dd, mask=in_row, other=0.0).to(ACC)
        grad_delta = g * go
        tl.store(
            grad_delta_ptr + b * stride_eb + j * stride_ek + offs * stride_ed,
            grad_delta.to(grad_delta_ptr.dtype.element_ty),
            mask=in_row,
        )
        dot += go * d
    tl.store(grad_gate_ptr + b * stride_hb + j * stride_hk, tl.sum(dot, axis=0).to(grad_gate_ptr.dtype.element_ty))


def _acc(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block(dim: int) -> int:
    return min(BLOCK_D_MAX, triton.next_power_of_2(dim))


def inverse_index(idx: torch.Tensor, length: int) -> torch.Tensor:
    """[B, length] int32 with ``inv[b, idx[b, j]] = j`` and -1 elsewhere (idx unique within a row)."""
    inv = torch.full((idx.shape[0], length), -1, dtype=torch.int32, device=idx.device)
    positions = torch.arange(idx.shape[1], dtype=torch.int32, device=idx.device).expand_as(idx)
    return inv.scatter_(1, idx, positions)


def _scatter(x: torch.Tensor | None, idx: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor | None, length: int) -> torch.Tensor:
    batch, _, dim = delta.shape
    out = torch.empty_like(x) if x is not None else delta.new_empty(batch, length, dim)
    if out.numel() == 0:
        return out
    inv = inverse_index(idx, length)
    block = _block(dim)
    dummy = delta  # never read when the matching HAS_ flag is off
    x_arg = x if x is not None else dummy
    g_arg = gate if gate is not None else idx
    _gated_scatter_add_kernel[(batch * length, triton.cdiv(dim, block))](
        x_arg, inv, delta, g_arg, out,
        length, dim,
        *(x.stride() if x is not None else (0, 0, 0)),
        *inv.stride(),
        *delta.stride(),
        *(gate.stride() if gate is not None else (0, 0)),
        *out.stride(),
        HAS_X=x is not None, HAS_GATE=gate is not None, ACC=_acc(delta.dtype), BLOCK_D=block,
    )
    return out


def gated_scatter_add_triton(x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Fused ``x`` copy plus ``gate · delta`` added at ``idx``.

    Args:
        x: [B, T, D]; delta: [B, K, D] of x's dtype; gate: [B, K], any float dtype; idx: [B, K] int64,
        unique within a row. Any strides.

    Returns:
        [B, T, D] like ``x``.
    """
    return _scatter(x, idx, delta, gate, x.shape[1])


def scatter_tokens_triton(src: torch.Tensor, idx: torch.Tensor, length: int) -> torch.Tensor:
    """[B, K, D] rows placed at ``idx`` in a zero [B, length, D] tensor, in one pass."""
    return _scatter(None, idx, src, None, length)


def gated_scatter_add_backward_triton(
    grad_out: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate · grad_out[idx], Σ_D grad_out[idx] · delta)``, shaped like ``delta`` and ``gate``."""
    batch, k, dim = delta.shape
    grad_delta = torch.empty_like(delta)
    grad_gate = torch.empty_like(gate)
    if delta.numel() == 0:
        return grad_delta, grad_gate.zero_()
    _gated_scatter_add_bwd_kernel[(batch * k,)](
        grad_out, idx, delta, gate, grad_delta, grad_gate,
        grad_out.shape[1], k, dim,
        *grad_out.stride(), *idx.stride(), *delta.stride(), *gate.stride(), *grad_delta.stride(), *grad_gate.stride(),
        ACC=_acc(delta.dtype), BLOCK_D=_block(dim),
    )
    return grad_delta, grad_gate
