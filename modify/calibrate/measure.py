"""What calibration measures: the loss of the model with one block, or every block, routed in a given way.

Blocks before the one measured replay their cached outputs (:func:`replay`), so a measurement costs only the
blocks from it on. :func:`variant` routes a block at a capacity with its gate held at 1 (or removes it: capacity 0);
:func:`set_plan` routes every block as a plan says, with fitted routers and skip paths.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from modify.calibrate.planning import Option, option_kv
from modify.calibrate.skip_fit import attach_skip
from modify.routing.forward import routed_forward
from modify.routing.router import ROUTER_ATTR

__all__ = [
    "measure_loss",
    "replay",
    "variant",
    "option_key",
    "sensitivity_tables",
    "set_plan",
    "plan_loss",
    "refined_tables",
    "load_router",
]


def measure_loss(model: nn.Module, ids: torch.Tensor) -> float:
    return float(model(input_ids=ids, labels=ids, use_cache=False).loss)


@contextlib.contextmanager
def replay(blocks: Sequence[nn.Module], cached: Sequence[Any]) -> Iterator[None]:
    """Blocks return their cached dense outputs instead of computing them."""
    for block, out in zip(blocks, cached):
        block.forward = types.MethodType(lambda self, *a, _out=out, **k: _out, block)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for block in blocks:
            block.forward = types.MethodType(routed_forward, block)  # type: ignore[method-assign]


def sensitivity_tables(
    model: nn.Module,
    blocks: list[nn.Module],
    states: list[Any],
    windows: torch.Tensor,
    sens_batches: list[list[int]],
    dense: Any,
    grid: Sequence[float],
    specs: Sequence[str],
    fits: dict[tuple[int, float, str], dict[str, torch.Tensor]],
    report: Callable,
    kvs: Sequence[str] = ("routed",),
) -> dict[str, dict[str, float]]:
    """Loss increase per block: removed ("0"), and routing its most important tokens at each capacity, with
    each candidate skip path and each of ``kvs`` (keys as :func:`option_key`; at capacity 0 a path runs on every
    token)."""
    routed = sorted((c for c in grid if c < 1.0), reverse=True)
    # Removal ("0") is always measured, on the grid or not: the chart's baseline, and replan's removal options.
    variants: list[tuple[Any, ...]] = [(0.0, "identity")]
    for c in routed:  # kv="all" is a way to route tokens: a removed block (0) has no tokens to route
        variants += [(c, spec, *(("all",) if kv == "all" and c > 0 else ())) for spec in specs for kv in kvs]
    variants = list(dict.fromkeys(variants))
    table: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for i, block in enumerate(blocks):
            router = getattr(block, ROUTER_ATTR)
            row = {}
            for option in variants:
                c, spec = option[:2]
                losses = []
                for b, batch in enumerate(sens_batches):
                    oracle = dense.importance[i][b]
                    handle = router.register_forward_hook(lambda m, a, out, _o=oracle: _o)
                    with (
                        replay(blocks[:i], [dense.outputs[j][b] for j in range(i)]),
                        variant(block, states[i], c, router, option_kv(option)),
                    ):
                        attach_skip(block, states[i], spec, fits.get((i, c, spec)))
                        losses.append(measure_loss(model, windows[batch]))
                        attach_skip(block, states[i], "identity", None)
                    handle.remove()
                row[option_key(*option)] = sum(losses) / len(losses) - dense.loss
            row["1"] = 0.0
            table[str(i)] = row
            report("sensitivity", i + 1, len(blocks))
    return table


def option_key(capacity: float, spec: str, kv: str = "routed") -> str:
    """The sensitivity table's key for an option: "0.5" (pure MoD), "0.5 linear-32", "0.5 kv-all"."""
    key = f"{capacity:g}" if spec == "identity" else f"{capacity:g} {spec}"
    return key if kv == "routed" else f"{key} kv-{kv}"


def set_plan(
    blocks: list[nn.Module],
    states: list[Any],
    options: Sequence[Option],
    routers: dict[int, dict[str, torch.Tensor]] | None,
    fits: dict[tuple[int, float, str], dict[str, torch.Tensor]],
) -> None:
    """Route every block as planned ((capacity, skip path[, kv]) per block), with the fitted routers (or zero
    routers when ``routers`` is None) and the fitted skip paths."""
    for i, block in enumerate(blocks):
        c, spec = options[i][:2]
        states[i].capacity, states[i].enabled, states[i].kv = c, c < 1.0, option_kv(options[i])
        load_router(getattr(block, ROUTER_ATTR), routers[i] if routers is not None else None)
        attach_skip(block, states[i], spec, fits.get((i, c, spec)))


def plan_loss(model: nn.Module, windows: torch.Tensor, sens_batches: list[list[int]]) -> float:
    with torch.no_grad():
        return sum(measure_loss(model, windows[b]) for b in sens_batches) / len(sens_batches)


def refined_tables(
    model: nn.Module,
    blocks: list[nn.Module],
    states: list[Any],
    windows: torch.Tensor,
    sens_batches: list[list[int]],
    routers: dict[int, dict[str, torch.Tensor]],
    fits: dict[tuple[int, float, str], dict[str, torch.Tensor]],
    plan: Sequence[Option],
    options: Sequence[Option],
    report: Callable,
) -> list[dict[Option, float]]:
    """Each block's loss increase for each option, with every other block routed as planned.

    The additive prediction measures blocks one at a time on the dense model; effects compound, so the
    tables are measured again around the plan, the way the first round measures them around dense.
    """
    set_plan(blocks, states, plan, routers, fits)
    outputs: list[list[Any]] = [[] for _ in blocks]
    handles = [b.register_forward_hook(lambda m, a, out, _i=i: outputs[_i].append(out)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for batch in sens_batches:
                measure_loss(model, windows[batch])
    finally:
        for h in handles:
            h.remove()
    tables = []
    with torch.no_grad():
        for i in range(len(blocks)):
            losses = {}
            for option in options:
                c, spec = option[:2]
                states[i].capacity, states[i].enabled, states[i].kv = c, c < 1.0, option_kv(option)
                attach_skip(blocks[i], states[i], spec, fits.get((i, c, spec)))
                total = 0.0
                for b, batch in enumerate(sens_batches):
                    with replay(blocks[:i], [outputs[j][b] for j in range(i)]):
                        total += measure_loss(model, windows[batch])
                losses[option] = total / len(sens_batches)
            c, spec = plan[i][:2]
            states[i].capacity, states[i].enabled, states[i].kv = c, c < 1.0, option_kv(plan[i])
            attach_skip(blocks[i], states[i], spec, fits.get((i, c, spec)))
            tables.append({o: losses[o] - losses[1.0, "identity"] for o in losses})
            report("refining", i + 1, len(blocks))
    return tables


def load_router(router: nn.Module, values: dict[str, torch.Tensor] | None) -> None:
    """Load fitted router ``values`` (from :func:`fit_router`) into ``router``, or reset it to a fresh zero
    router when ``values`` is None."""
    with torch.no_grad():
        for name, param in router.named_parameters():
            if values is None:
                param.fill_(1.0 if name == "scale" else 0.0)
            else:
                param.copy_(values[name].to(param.device, param.dtype))


@contextlib.contextmanager
def variant(
    block: nn.Module, state: Any, capacity: float, router: nn.Module, kv: str = "routed"
) -> Iterator[None]:
    """Block routed at ``capacity`` (with ``kv``) with its gate held at exactly 1, or removed (capacity 0: the
    routed forward's own removal, so a skip path attached to the block gives every token its estimate)."""
    saved_scale = router.scale.detach().clone()
    state.enabled, state.capacity, state.kv = True, capacity, kv
    with torch.no_grad():
        router.scale.zero_()
    try:
        yield
    finally:
        block.forward = types.MethodType(routed_forward, block)  # type: ignore[method-assign]
        state.enabled, state.capacity, state.kv = False, 1.0, "routed"
        with torch.no_grad():
            router.scale.copy_(saved_scale)
