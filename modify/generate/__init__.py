"""Sampling from a converted model: causal routing rules and the routed forward behind ``generate()``."""

from __future__ import annotations

from modify.generate.causal import (
    ROUTING_MODES,
    fit_thresholds,
    measure_agreement,
    routing_mode,
    set_routing,
)

__all__ = ["ROUTING_MODES", "set_routing", "routing_mode", "fit_thresholds", "measure_agreement"]
