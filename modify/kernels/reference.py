"""Pure-PyTorch reference implementations of the routing ops.

These are what the CPU path runs, what the tests compare against and what the benchmarks time as the
baseline. A Triton implementation of the same names lives beside them on GPU (a later issue); its results
are checked against these functions.

Shapes use B (batch), T (sequence length), k (tokens routed through a block, k <= T) and D (hidden size).
"""

from __future__ import annotations

import torch

__all__ = ["gather_tokens", "gated_scatter_add", "gather_token_dim", "scatter_tokens", "gated_scatter_add_backward"]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Select tokens per sequence.

    Args:
        x: [B, T, D] hidden states.
        idx: [B, k] int64 token positions, sorted ascending within each row.

    Returns:
        [B, k, D] with ``out[b, j] = x[b, idx[b, j]]``.
    """
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gated_scatter_add(x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Add the gated block contribution of the routed tokens back into the residual stream.

    Args:
        x: [B, T, D] residual stream (the block's input); not modified.
        idx: [B, k] int64 positions of the routed tokens (unique within a row).
        delta: [B, k, D] what the block adds for those tokens (attention and MLP branches, no residual).
        gate: [B, k] gate value per routed token.

    Returns:
        [B, T, D] equal to ``x`` except ``out[b, idx[b, j]] = x[b, idx[b, j]] + gate[b, j] * delta[b, j]``.
    """
    scaled = delta * gate.unsqueeze(-1).to(delta.dtype)
    return x.scatter_add(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), scaled.to(x.dtype))


def gather_token_dim(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather a per-token argument of a block along one token dimension.

    ``t`` has its batch at dim 0 with size B or 1 (broadcast, as Hugging Face passes rotary tables and
    position ids), and T at ``dim``. A batch of 1 is expanded to B, since each sequence routes its own tokens.

    Args:
        t: tensor with ``t.shape[dim] == T`` and ``t.shape[0] in (1, B)``.
        idx: [B, k] int64 token positions.
        dim: the token dimension of ``t`` (>= 1).

    Returns:
        ``t`` with ``dim`` reduced to k, batch B.
    """
    batch = idx.shape[0]
    if t.shape[0] != batch:
        t = t.expand(batch, *t.shape[1:])
    moved = t.movedim(dim, 1)
    rows = torch.arange(batch, device=idx.device).unsqueeze(-1)
    return moved[rows, idx].movedim(1, dim)


def scatter_tokens(src: torch.Tensor, idx: torch.Tensor, length: int) -> torch.Tensor:
    """The adjoint of :func:`gather_tokens`: [B, k, D] rows placed at ``idx`` in [B, length, D], zeros elsewhere."""
    out = src.new_zeros(src.shape[0], length, src.shape[-1])
    return out.scatter(1, idx.unsqueeze(-1).expand(-1, -1, src.shape[-1]), src)


def gated_scatter_add_backward(
    grad_out: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`gated_scatter_add` for ``delta`` and ``gate`` (the one for ``x`` is ``grad_out``).

    Returns:
        ``grad_delta = gate · gather(grad_out)`` ([B, k, D], delta's dtype) and
        ``grad_gate = Σ_D gather(grad_out) · delta`` ([B, k], gate's dtype).
    """
    rows = gather_tokens(grad_out, idx)
    grad_delta = rows * gate.unsqueeze(-1).to(rows.dtype)
    grad_gate = (rows.to(gate.dtype) * delta.to(gate.dtype)).sum(-1)
    return grad_delta.to(delta.dtype), grad_gate
