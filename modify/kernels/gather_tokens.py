"""Triton kernels that move token rows: the top-k gather, and its adjoint scatter.

``gather_tokens``: out[b, j, :] = x[b, idx[b, j], :]. One program copies one gathered row's block of
BLOCK_D features; the row's source position is loaded from ``idx`` first.

The reference is :func:`modify.kernels.reference.gather_tokens`; the torch op that dispatches here is
``torch.ops.modify.gather_tokens`` (:mod:`modify.kernels.ops`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gather_tokens_triton", "BLOCK_D_MAX"]

#: Features per program. 1024 elements keep a row's copy in a few wide vector loads while leaving
#: several programs per row for D = 4096, so that small batches still fill the GPU.
BLOCK_D_MAX = 1024


@triton.jit
def _gather_tokens_kernel(
    # pointers
    x_ptr,  # [B, T, D] source hidden states
    idx_ptr,  # [B, K] int64 positions, each in [0, T)
    out_ptr,  # [B, K, D] gathered rows
    # sizes
    T,  # tokens per sequence in x
    K,  # tokens gathered per sequence
    D,  # features per token
    # strides, in elements
    stride_xb, stride_xt, stride_xd,
    stride_ib, stride_ik,
    stride_ob, stride_ok, stride_od,
    # meta
    BLOCK_D: tl.constexpr,  # features per program (power of two)
):
    # int64 throughout: B*T*D passes 2**31 at realistic sizes (8 x 4096 x 4096 = 2**27 rows x features).
    row = tl.program_id(0).to(tl.int64)
    b = row // K
    j = row % K
    t = tl.load(idx_ptr + b * stride_ib + j * stride_ik).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    tv = t + tl.zeros([BLOCK_D], dtype=tl.int64)  # vector mask: the interpreter rejects scalar & vector masks
    in_row = offs < D
    valid = in_row & (tv >= 0) & (tv < T)  # an out-of-range index reads nothing instead of stray memory
    v = tl.load(x_ptr + b * stride_xb + tv * stride_xt + offs * stride_xd, mask=valid, other=0.0)
    tl.store(out_ptr + b * stride_ob + j * stride_ok + offs * stride_od, v, mask=in_row)


def gather_tokens_triton(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather rows of ``x`` at ``idx``.

    Args:
        x: [B, T, D], any strides, float16 / bfloat16 / float32 / float64.
        idx: [B, K] int64, values in [0, T) (checked by the op in debug mode; masked here).

    Returns:
        [B, K, D] contiguous, x's dtype.
    """
    assert x.dim() == 3 and idx.dim() == 2 and idx.shape[0] == x.shape[0], "x is [B, T, D] and idx is [B, K]"
    batch, length, dim = x.shape
    k = idx.shape[1]
    out = torch.empty(batch, k, dim, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block = min(BLOCK_D_MAX, triton.next_power_of_2(dim))
    grid = (batch * k, triton.cdiv(dim, block))
    _gather_tokens_kernel[grid](
        x, idx, out,
        length, k, dim,
        *x.stride(), *idx.stride(), *out.stride(),
        BLOCK_D=block,
    )
    return out
