"""Routing ops: top-k token gather and gated scatter-add.

The routed blocks call the ops through this module, so that a faster implementation can replace the
reference without touching the callers. Today every device runs :mod:`modify.kernels.reference`; the fused
Triton kernels and their ``torch.library`` registration are tracked as a separate issue.
"""

from __future__ import annotations

from modify.kernels.reference import gated_scatter_add, gather_token_dim, gather_tokens

__all__ = ["gather_tokens", "gated_scatter_add", "gather_token_dim"]
