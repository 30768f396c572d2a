"""The planner: budget always met, the dynamic program equals brute force, degenerate budgets explained."""

from __future__ import annotations

import random

import pytest

from modify.calibrate.planning import (
    DEFAULT_GRID,
    brute_force_plan,
    cosine_depth,
    every_other,
    explicit,
    plan_under_budget,
    uniform,
)


def _tables(n: int, seed: int, same_cost: bool = True) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    loss, cost = [], []
    for _ in range(n):
        scale = rng.uniform(0.001, 3.0)
        loss.append({c: 0.0 if c == 1.0 else scale * (1 - c) ** rng.uniform(0.5, 2) for c in DEFAULT_GRID})
        width = 1.0 if same_cost else rng.uniform(0.5, 2.0)
        cost.append({c: width * (0.9 * c + 0.1 * c * c) + (0.01 if c < 1 else 0) for c in DEFAULT_GRID})
    return loss, cost


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.75, 0.9])
def test_dynamic_program_matches_brute_force(seed: int, budget: float) -> None:
    loss, cost = _tables(5, seed, same_cost=seed % 2 == 0)
    try:
        expected = brute_force_plan(loss, cost, budget)
    except ValueError:
        with pytest.raises(ValueError):
            plan_under_budget(loss, cost, budget)
        return
    plan = plan_under_budget(loss, cost, budget)
    assert plan.predicted_loss_increase == pytest.approx(expected.predicted_loss_increase, abs=1e-12)
    assert plan.cost <= budget * plan.dense_cost * (1 + 1e-12)


@pytest.mark.parametrize("budget", [0.2, 0.5, 0.75, 0.95])
def test_budget_is_always_met_on_thirty_blocks(budget: float) -> None:
    loss, cost = _tables(30, seed=3)
    plan = plan_under_budget(loss, cost, budget)
    assert len(plan.capacities) == 30
    assert plan.cost_ratio <= budget + 1e-12
    recomputed = sum(c[cap] for c, cap in zip(cost, plan.capacities))
    assert recomputed == pytest.approx(plan.cost)


def test_insensitive_blocks_are_routed_first() -> None:
    loss = [{c: (1 - c) * w for c in DEFAULT_GRID} for w in (100.0, 0.1, 0.1, 100.0)]
    cost = [{c: c for c in DEFAULT_GRID} for _ in range(4)]
    plan = plan_under_budget(loss, cost, 0.6)
    assert plan.capacities[0] == plan.capacities[3] == 1.0
    assert plan.capacities[1] < 1.0 and plan.capacities[2] < 1.0


@pytest.mark.parametrize(
    "budget,message",
    [
        (1.0, "leaves the dense cost: nothing needs routing"),
        (1.5, "nothing needs routing"),
        (0.0, "must be a number in \\(0, 1\\)"),
        (0.005, "below the cheapest plan on this grid"),
    ],
)
def test_degenerate_budgets(budget: float, message: str) -> None:
    loss, cost = _tables(4, seed=0)
    with pytest.raises(ValueError, match=message):
        plan_under_budget(loss, cost, budget)


def test_schedules() -> None:
    assert every_other(5, 0.25) == [1.0, 0.25, 1.0, 0.25, 1.0]
    assert uniform(3, 0.5) == [0.5, 0.5, 0.5]
    assert explicit({2: 0.5}, 4) == [1.0, 1.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="out of range"):
        explicit({4: 0.5}, 4)
    caps = cosine_depth(10, low=0.125)
    assert caps[0] == caps[-1] == 1.0
    assert caps[1] == pytest.approx(1.0) and caps[-2] == pytest.approx(0.125)
    assert all(a >= b for a, b in zip(caps[1:-1], caps[2:-1]))


def _option_tables(n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Options (capacity, skip path): a path costs FLOPs on the skipped tokens and may lower the loss."""
    rng = random.Random(seed)
    loss, cost = [], []
    for _ in range(n):
        scale, helps = rng.uniform(0.001, 3.0), rng.uniform(0.0, 1.0)
        routed = [c for c in DEFAULT_GRID if c < 1]
        lose = {(1.0, "identity"): 0.0}
        pay = {(1.0, "identity"): 1.0}
        for c in routed:
            lose[c, "identity"] = scale * (1 - c)
            pay[c, "identity"] = c + 0.01
            lose[c, "linear-8"] = scale * (1 - c) * helps
            pay[c, "linear-8"] = c + 0.01 + 0.2 * (1 - c)
        loss.append(lose)
        cost.append(pay)
    return loss, cost


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("budget", [0.4, 0.6, 0.8])
def test_skip_path_options_match_brute_force_and_meet_the_budget(seed: int, budget: float) -> None:
    loss, cost = _option_tables(4, seed)
    expected = brute_force_plan(loss, cost, budget)
    plan = plan_under_budget(loss, cost, budget)
    assert plan.predicted_loss_increase == pytest.approx(expected.predicted_loss_increase, abs=1e-12)
    assert sum(c[o] for c, o in zip(cost, plan.capacities)) <= budget * plan.dense_cost * (1 + 1e-12)
    assert all(isinstance(o, tuple) and o in c for c, o in zip(cost, plan.capacities))


def test_a_skip_path_is_chosen_only_where_it_pays_for_its_flops() -> None:
    loss, cost = _option_tables(2, seed=0)
    for table in loss:  # the path removes almost all of the loss in block 0, none of it in block 1
        for option in table:
            if option[1] == "linear-8":
                table[option] = table[option[0], "identity"] * (0.01 if table is loss[0] else 1.0)
    plan = plan_under_budget(loss, cost, 0.7)
    assert plan.capacities[0][1] == "linear-8"
    assert plan.capacities[1][1] == "identity"
