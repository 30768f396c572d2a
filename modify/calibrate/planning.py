"""Plans: which blocks are routed and at what capacity, from a schedule or under a FLOP budget.

Schedules (no data needed): :func:`uniform`, :func:`every_other` (the paper's plan), :func:`explicit` and
:func:`cosine_depth` (capacity decaying with depth, as p-MoD's progressive ratio decay).

Under a budget, :func:`plan_under_budget` picks one capacity per block from a discrete grid (1.0 meaning
"not routed") to minimise the predicted loss increase, Σ_i ΔL_i(c_i), subject to
Σ_i cost_i(c_i) <= F · Σ_i cost_i(1.0): the blocks' forward FLOPs at the calibration sequence length,
routers included. The prediction assumes the blocks' effects add up (measured one block at a time, see
:mod:`modify.calibrate.calibration`). The optimisation is a multiple-choice knapsack solved exactly by dynamic
programming over blocks, keeping only the Pareto frontier of (cost, loss) partial plans; it agrees with
brute force on small cases (tests/test_planning.py).

A block's options are its grid capacities, or (capacity, skip path) pairs when skip paths are candidates, and
(capacity, skip path, "all") triples where routed tokens may attend to every token's keys and values
(``kv="all"``, :mod:`modify.routing.kv_all`; its key/value side on every token is in the option's cost)
(:mod:`modify.routing.skip_path`): the planner then chooses both under the same budget, a skip path's FLOPs on the
skipped tokens counted in the option's cost. Exactly one option per block has capacity 1.0: dense.

Capacity 0 is removal (ShortGPT's static baseline): the block costs nothing, or its skip path's FLOPs on every
token. It is on the default grid, so the planner chooses among removal, routing and skip paths under one
budget, and a calibrated plan is never worse than the best removal-only plan by the planner's own measure
(removal-only is a subset of the options). :func:`restrict_removal` narrows the options to removal only, or
to none of it (:data:`REMOVAL_MODES`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: A block's option: a capacity, or a (capacity, skip-path spec) pair.
Option = Any

__all__ = [
    "DEFAULT_GRID",
    "REMOVAL_MODES",
    "restrict_removal",
    "BudgetPlan",
    "uniform",
    "every_other",
    "explicit",
    "cosine_depth",
    "plan_under_budget",
    "brute_force_plan",
    "option_capacity",
    "option_kv",
]

#: Capacities the planner may choose; 1.0 leaves a block dense, 0.0 removes it.
DEFAULT_GRID = (1.0, 0.75, 0.5, 0.25, 0.125, 0.0)
#: "allow": removal is one option among the others; "only": each block is kept dense or removed outright
#: (no routing, no skip path: a plan that :func:`modify.export_pruned` writes as a plain checkpoint);
#: "never": no block is removed (the plans before removal existed).
REMOVAL_MODES = ("allow", "only", "never")


def uniform(num_blocks: int, capacity: float, blocks: Sequence[int] | None = None) -> list[float]:
    """``capacity`` on ``blocks`` (all by default), 1.0 elsewhere."""
    chosen = set(range(num_blocks) if blocks is None else blocks)
    return [capacity if i in chosen else 1.0 for i in range(num_blocks)]


def every_other(num_blocks: int, capacity: float = 0.125) -> list[float]:
    """The paper's plan: ``capacity`` on blocks 1, 3, 5, ..."""
    return uniform(num_blocks, capacity, range(1, num_blocks, 2))


def explicit(capacities: dict[int, float], num_blocks: int) -> list[float]:
    """Per-block capacities given as {block index: capacity}."""
    for i in capacities:
        if not 0 <= i < num_blocks:
            raise ValueError(f"block index {i} is out of range: valid indices are 0..{num_blocks - 1}")
    return [capacities.get(i, 1.0) for i in range(num_blocks)]


def cosine_depth(
    num_blocks: int, low: float, high: float = 1.0, skip_first: int = 1, skip_last: int = 1
) -> list[float]:
    """Capacity falling from ``high`` to ``low`` along a half cosine over the middle blocks.

    The first ``skip_first`` and last ``skip_last`` blocks stay dense: on pretrained models they are the
    least tolerant of skipping (on SmolLM2-135M, skipping block 0 multiplies perplexity by about 500).
    """
    middle = list(range(skip_first, num_blocks - skip_last))
    caps = [1.0] * num_blocks
    for j, i in enumerate(middle):
        t = j / max(1, len(middle) - 1)
        caps[i] = low + (high - low) * (1 + math.cos(math.pi * t)) / 2
    return caps


def option_capacity(option: Option) -> float:
    """The capacity of an option: the option itself, or the first item of a (capacity, skip path) pair."""
    return float(option[0] if isinstance(option, tuple) else option)


def option_kv(option: Option) -> str:
    """What a skipped token leaves in the block's attention under an option: "all" for a (capacity, skip path,
    "all") triple, "routed" otherwise."""
    return str(option[2]) if isinstance(option, tuple) and len(option) > 2 else "routed"


def _order(option: Option) -> tuple[float, str, str]:
    return option_capacity(option), str(option[1]) if isinstance(option, tuple) else "", option_kv(option)


def _dense(table: dict[Option, float]) -> Option:
    return next(o for o in table if option_capacity(o) == 1.0)


def restrict_removal(tables: Sequence[dict[Option, float]], removal: str) -> list[dict[Option, float]]:
    """The per-block option tables (loss or cost) narrowed as ``removal`` says (see :data:`REMOVAL_MODES`)."""
    if removal not in REMOVAL_MODES:
        raise ValueError(f"unknown removal mode {removal!r}; choose one of {', '.join(REMOVAL_MODES)}")

    def keep(option: Option) -> bool:
        c = option_capacity(option)
        if removal == "never":
            return c > 0.0
        if removal == "only":
            return c == 1.0 or (c == 0.0 and (not isinstance(option, tuple) or option[1] == "identity"))
        return True

    narrowed = [{o: v for o, v in table.items() if keep(o)} for table in tables]
    if removal == "only" and any(len(t) < 2 for t in narrowed):
        raise ValueError("removal-only planning needs capacity 0 (pure removal) among the options; add 0 to the grid")
    return narrowed


@dataclass(frozen=True)
class BudgetPlan:
    """The planner's answer: one option (capacity or (capacity, skip path)) per block, and what it costs and
    is predicted to lose."""

    capacities: tuple[Option, ...]
    cost: float
    dense_cost: float
    predicted_loss_increase: float

    @property
    def cost_ratio(self) -> float:
        return self.cost / self.dense_cost


def _check(loss: Sequence[dict[float, float]], cost: Sequence[dict[float, float]], budget: float) -> None:
    if len(loss) != len(cost) or not loss:
        raise ValueError("give one loss table and one cost table per block")
    for i, (l_i, c_i) in enumerate(zip(loss, cost)):
        dense = [o for o in c_i if option_capacity(o) == 1.0]
        if len(dense) != 1 or set(l_i) != set(c_i):
            raise ValueError(f"block {i}: the loss and cost tables need the same capacities, 1.0 included once")
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"FLOP budget {budget} must be a number in (0, 1), e.g. 0.75")
    if budget >= 1.0:
        raise ValueError(
            f"FLOP budget {budget} leaves the dense cost: nothing needs routing; use a budget below 1, e.g. 0.75"
        )
    dense = sum(c[_dense(c)] for c in cost)
    cheapest = sum(min(c.values()) for c in cost)
    if cheapest > budget * dense:
        raise ValueError(
            f"FLOP budget {budget} is below the cheapest plan on this grid ({cheapest / dense:.3f}: every block at its "
            "smallest capacity); raise the budget or add smaller capacities to the grid"
        )


def plan_under_budget(
    loss: Sequence[dict[float, float]], cost: Sequence[dict[float, float]], budget: float
) -> BudgetPlan:
    """The grid plan with the least predicted loss increase whose cost is within ``budget`` of dense.

    Args:
        loss: per block, option -> predicted loss increase (0 at capacity 1.0).
        cost: per block, option -> forward FLOPs of the block (capacity 1.0: dense).
        budget: F in (0, 1): the blocks may cost at most F times their dense cost.

    Raises:
        ValueError: a budget of 1 or more (nothing to route), or below the cheapest plan on the grid.
    """
    _check(loss, cost, budget)
    dense = sum(c[_dense(c)] for c in cost)
    limit = budget * dense
    # frontier: cost -> (loss, capacities), kept Pareto-optimal (no other state is cheaper and no worse).
    frontier: list[tuple[float, float, tuple[float, ...]]] = [(0.0, 0.0, ())]
    remaining_min = [sum(min(c.values()) for c in cost[i:]) for i in range(len(cost) + 1)]
    for i, (l_i, c_i) in enumerate(zip(loss, cost)):
        candidates = [
            (f_cost + c_i[cap], f_loss + l_i[cap], caps + (cap,))
            for f_cost, f_loss, caps in frontier
            for cap in sorted(c_i, key=_order, reverse=True)
            if f_cost + c_i[cap] + remaining_min[i + 1] <= limit * (1 + 1e-12)
        ]
        candidates.sort(key=lambda s: (s[0], s[1], tuple(-option_capacity(c) for c in s[2])))
        frontier, best = [], math.inf
        for state in candidates:
            if state[1] < best:
                frontier.append(state)
                best = state[1]
    total_cost, total_loss, caps = min(frontier, key=lambda s: (s[1], s[0]))
    return BudgetPlan(caps, total_cost, dense, total_loss)


def brute_force_plan(
    loss: Sequence[dict[float, float]], cost: Sequence[dict[float, float]], budget: float
) -> BudgetPlan:
    """Every combination of the grid; for testing the dynamic program on small cases."""
    _check(loss, cost, budget)
    dense = sum(c[_dense(c)] for c in cost)
    best: BudgetPlan | None = None
    for caps in itertools.product(*[sorted(c, key=_order, reverse=True) for c in cost]):
        total = sum(c[cap] for c, cap in zip(cost, caps))
        if total > budget * dense * (1 + 1e-12):
            continue
        lost = sum(table[cap] for table, cap in zip(loss, caps))
        if best is None or (lost, total) < (best.predicted_loss_increase, best.cost):
            best = BudgetPlan(tuple(caps), total, dense, lost)
    assert best is not None
    return best
