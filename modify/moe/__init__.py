"""Mixture-of-Depths on Mixture-of-Experts layers: the integrated no-op expert (:mod:`modify.moe.noop`)."""

from __future__ import annotations

from modify.moe.noop import NOOP_ATTR, NoOpExpert, NoOpState, find_moe, install_noop, uninstall_noop

__all__ = ["NOOP_ATTR", "NoOpExpert", "NoOpState", "find_moe", "install_noop", "uninstall_noop"]
