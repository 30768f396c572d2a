"""Mixture-of-Depths on Mixture-of-Experts layers: the integrated no-op expert (:mod:`modify.moe.noop`).

The no-op is a selection rule (the tokens of lowest margin against their best expert) around the routing
core's routed call, with the expert layer as the computation and zeros as the base. May import:
:mod:`modify.routing` and below.
"""

from __future__ import annotations

from modify.moe.noop import NOOP_ATTR, NoOpExpert, NoOpState, find_moe, install_noop, noop_layers, uninstall_noop

__all__ = ["NOOP_ATTR", "NoOpExpert", "NoOpState", "find_moe", "install_noop", "uninstall_noop", "noop_layers"]
