"""The routing core: what runs inside a routed block, and nothing about models, files or training.

- :mod:`~modify.routing.router` and :mod:`~modify.routing.skip_path`: the modules a routed block gains;
- :mod:`~modify.routing.selection` and :mod:`~modify.routing.rules`: the selection rules (top-k, the causal
  rules), which turn scores into indices or a keep mask; :mod:`~modify.routing.thresholds`: the running
  threshold the causal rule and the MoDE no-op share;
- :mod:`~modify.routing.arguments`: a block call's arguments, read and gathered for the selected tokens;
- :mod:`~modify.routing.call`: the routed call, gather → Δ → gated scatter-add, the one place it happens;
- :mod:`~modify.routing.forward` (top-k, removal, the router phase) and :mod:`~modify.routing.ragged` (a
  per-token selection, with a cache): the paths of a routed block's forward;
- :mod:`~modify.routing.state`: a block's plan, captured program, mode and attachments;
- :mod:`~modify.routing.placement`: routing under accelerate's hooks (device maps, offload).

May import: :mod:`modify.passes`, :mod:`modify.kernels`, :mod:`modify.archs`, :mod:`modify.errors`. A key-value
cache is followed through the :class:`~modify.routing.ragged.CacheFollower` that :mod:`modify.generate`
registers, so that this package never imports generation.
"""

from __future__ import annotations

from modify.routing.arguments import block_padding, mask_allows, padding_from_mask, pairwise_mask, recent_padding
from modify.routing.forward import install, routed_forward, uninstall
from modify.routing.selection import capacity_tokens, select_tokens, skipped_tokens
from modify.routing.state import STATE_ATTR, BlockPlan, BlockProgram, RoutingState, routed_blocks

__all__ = [
    "RoutingState",
    "BlockPlan",
    "BlockProgram",
    "STATE_ATTR",
    "capacity_tokens",
    "select_tokens",
    "skipped_tokens",
    "padding_from_mask",
    "block_padding",
    "recent_padding",
    "mask_allows",
    "pairwise_mask",
    "routed_blocks",
    "routed_forward",
    "install",
    "uninstall",
]
