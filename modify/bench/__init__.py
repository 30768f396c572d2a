"""Benchmarking converted models end to end: ``modify bench`` (see docs/benchmarks.md).

:mod:`modify.bench.models` builds named shapes and reads plans; :mod:`modify.bench.baselines` holds the masked
and per-sample implementations a converted model is compared with; :mod:`modify.bench.measure` times, counts
and profiles; :mod:`modify.bench.report` writes the table, JSON summary, CSV and chart.

May import: :mod:`modify.train`, :mod:`modify.calibrate` and every layer below them; not the command line.
"""

from __future__ import annotations

from modify.bench.baselines import IMPLEMENTATIONS, implementation
from modify.bench.measure import BenchSettings, profile_step, run_bench
from modify.bench.models import SHAPES, BenchPlan, apply_plan, build_shape, parse_plan

__all__ = [
    "IMPLEMENTATIONS",
    "implementation",
    "BenchSettings",
    "profile_step",
    "run_bench",
    "SHAPES",
    "BenchPlan",
    "apply_plan",
    "build_shape",
    "parse_plan",
]
