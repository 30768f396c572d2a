"""Routing ops: top-k token gather and gated scatter-add.

``gather_tokens`` and ``gated_scatter_add`` are the torch custom ops ``torch.ops.modify.*`` of
:mod:`modify.kernels.ops`: fused Triton kernels on GPU, the PyTorch reference of
:mod:`modify.kernels.reference` on CPU. Importing this package does not import triton.

The bottom layer: imports nothing of modify.
"""

from __future__ import annotations

from modify.kernels.ops import backend, gated_scatter_add, gather_tokens, use_backend
from modify.kernels.reference import gather_token_dim

__all__ = ["gather_tokens", "gated_scatter_add", "gather_token_dim", "use_backend", "backend"]
