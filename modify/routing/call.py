"""The routed call: gather the selected tokens, run the computation on them, add the gated parts back.

Every routed computation goes through :func:`routed_call`: the top-k forward of a block, the per-token forward
behind ``generate()`` (:mod:`modify.routing.ragged`) and the MoDE no-op expert (:mod:`modify.moe.noop`).
What differs between them is only which tokens (a selection rule's indices), what runs on them (a block's Δ
graph with its gathered arguments, or an expert layer) and what the parts are added into (the residual stream,
or zeros)::

    x [B, T, D] ──gather idx [B, k]──▶ xs [B, k, D] ──run──▶ parts ──g·part, scatter-add at idx──▶ y [B, T, D]

The parts are added one at a time in the computation's own order of additions (attention's, then the
MLP's; see :mod:`modify.passes.extract_delta`), so at gate 1 the result is bit-exact with the dense block.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import nn

from modify.kernels.ops import route_gather, route_scatter_add
from modify.passes.capture_block import call_structure
from modify.routing.arguments import gather_value

__all__ = ["routed_call", "routed_delta"]

Run = Callable[[torch.Tensor], tuple[Sequence[torch.Tensor], Any]]


def routed_call(
    x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor, run: Run, base: torch.Tensor | None = None
) -> tuple[torch.Tensor, Any]:
    """``base + Σ scatter(idx, gate · part)`` over the parts ``run`` computes from the gathered tokens.

    Args:
        x: [B, T, D] the tokens to select from.
        idx: [B, k] int64 positions, distinct per row; their order is the order ``run`` sees the tokens in.
        gate: [B, k] the weight of each selected token's parts (0 leaves a token as it was).
        run: called with the [B, k, D] selected tokens; returns the parts to add back, each [B, k, D], and
            anything else the caller wants from the computation (returned as it is).
        base: what the parts are added into; ``x`` by default (a residual block's update).

    Returns:
        [B, T, D] the result, in the promoted dtype of ``base`` and the parts (under autocast Δ comes out in
        the compute dtype while the stream keeps its own; x + Δ promotes); and what ``run`` returned besides.
    """
    parts, rest = run(route_gather(x, idx))
    y = x if base is None else base
    for i, part in enumerate(parts):
        dtype = torch.promote_types(y.dtype, part.dtype)
        if i == 0 or y.dtype != dtype:
            y = route_scatter_add(y.to(dtype), idx, part.to(dtype), gate)
        else:
            # y is already this call's own copy (nothing saved it for backward): add the later parts in place,
            # the same float operations without a second full-size copy per block.
            scaled = part.to(dtype) * gate.unsqueeze(-1).to(dtype)
            y = y.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, y.shape[-1]), scaled)
    return y, rest


def routed_delta(
    block: nn.Module, state: Any, named: dict[str, Any], idx: torch.Tensor, gate: torch.Tensor,
    given: Collection[str] = (),
) -> tuple[torch.Tensor, tuple[Any, ...]]:  # fmt: skip
    """A routed block's call of :func:`routed_call`: its Δ graph on the tokens ``idx`` selects, each argument of
    the call ``named`` gathered for them (those in ``given`` are already made for the gathered tokens).

    Returns the new hidden states and the block's other outputs (its attention weights), as the block would.
    """
    spec = state.spec
    x = named[spec.hidden]
    length = x.shape[1]

    def run(xs: torch.Tensor) -> tuple[Sequence[torch.Tensor], tuple[Any, ...]]:
        gathered = {
            key: xs if key == spec.hidden else value if key in given else gather_value(value, (key,), spec, idx, length)
            for key, value in named.items()
        }
        structure, leaves = call_structure(gathered, block.training)
        out = state.graph(block, structure)(*leaves)
        if spec.output_is_tuple:
            return out[0], tuple(out[1:])
        return out, ()

    return routed_call(x, idx, gate, run)
