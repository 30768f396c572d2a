"""Calibration: measure how much each block tolerates routing, plan capacities under a FLOP budget, and
initialise the routers, all from text run through the dense model.

1. **Data.** Text files are streamed (read and tokenised a chunk at a time, never loaded whole) into windows of
   ``seq_len`` tokens until ``tokens`` are collected. The token stream's SHA-256 is the data fingerprint.
2. **Dense pass** over every window, with hooks on the blocks: each block's input x and contribution Δ.
   A token's *importance* for a block is log ‖Δ‖: how much the block changes it.
3. **Sensitivity**, on a seeded subset of ``sensitivity_tokens`` tokens: the loss increase when block i is
   skipped entirely, and when it routes only the most important fraction c of tokens for each c of the grid
   (its true routed forward, with the importance as an oracle router and the gate held at 1). Blocks before
   i replay their cached dense outputs, so each measurement costs only the blocks from i on.
4. **Plan**: :func:`modify.planning.plan_under_budget` picks the capacities minimising the predicted loss
   increase, Σ_i ΔL_i(c_i), under the FLOP budget. The prediction assumes the blocks' effects add up; the
   report gives the measured increase of the chosen plan beside the predicted one.
5. **Routers**: each routed block's router is fitted by ridge regression from x (float64 normal equations,
   accumulated over the dense pass) to the importance, so its top-k picks the tokens that matter to that
   block. Its gate scale starts at 0, so every gate is exactly 1 and capacity 1.0 still reproduces the
   model. The report gives, per block, how many of the router's top-k tokens are the oracle's.

Everything is deterministic for a seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modify.api import convert, revert, routed_blocks
from modify.config import MoDConfig
from modify.flops import _attention_width, block_flops
from modify.passes.find_block_stack import find_block_stack
from modify.passes.probe_block_calls import bind_call
from modify.planning import DEFAULT_GRID, plan_under_budget
from modify.router import ROUTER_ATTR
from modify.routing import STATE_ATTR, capacity_tokens, select_tokens

__all__ = ["CalibrationSettings", "Calibration", "token_windows", "calibrate", "apply_calibration"]

_CHUNK_CHARS = 1 << 20


@dataclass(frozen=True)
class CalibrationSettings:
    """What calibration runs on.

    Attributes:
        tokens: calibration tokens for the dense pass and the router fit.
        seq_len: tokens per window (the FLOP budget is met at this length).
        budget: F in (0, 1): routed blocks cost at most F times the dense blocks' forward FLOPs.
        grid: capacities the planner may choose (1.0 = not routed).
        sensitivity_tokens: tokens on which each block's tolerance is measured.
        batch_size: windows per forward.
        seed: picks the sensitivity windows.
        keep_first: leading tokens every routed block always processes (1: the attention sink).
    """

    tokens: int = 65536
    seq_len: int = 512
    budget: float = 0.75
    grid: tuple[float, ...] = DEFAULT_GRID
    sensitivity_tokens: int = 2048
    batch_size: int = 4
    seed: int = 0
    keep_first: int = 1

    def __post_init__(self) -> None:
        if self.seq_len < 2 or self.tokens < self.seq_len:
            raise ValueError(f"need seq_len >= 2 and tokens >= seq_len, got {self.seq_len} and {self.tokens}")
        if 1.0 not in self.grid or any(not 0 < c <= 1 for c in self.grid):
            raise ValueError(f"the grid {self.grid} must hold capacities in (0, 1], 1.0 (not routed) included")


@dataclass
class Calibration:
    """The result: the plan and everything needed to reproduce and judge it.

    ``routers`` maps block index -> {"weight", "bias", "scale"} tensors; the rest is JSON-serialisable.
    """

    settings: dict[str, Any]
    data: dict[str, Any]
    num_blocks: int
    capacities: list[float]
    sensitivity: dict[str, dict[str, float]]
    cost_ratio: float
    predicted_loss_increase: float
    dense_loss: float
    measured_loss: float
    measured_loss_untrained_routers: float
    router_overlap: dict[str, float]
    routers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def routed(self) -> list[int]:
        return [i for i, c in enumerate(self.capacities) if c < 1.0]

    def plan(self) -> MoDConfig:
        return MoDConfig(
            self.num_blocks,
            self.routed,
            [self.capacities[i] for i in self.routed],
            keep_first=self.settings["keep_first"],
            calibration=self.to_dict(),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("routers")
        return out


def token_windows(
    tokenizer: Any, files: Sequence[Path], seq_len: int, tokens: int, chunk_chars: int = _CHUNK_CHARS
) -> tuple[torch.Tensor, dict[str, Any]]:
    """[N, seq_len] token windows streamed from ``files`` in order, and the data record (fingerprint, files).

    Files are read ``chunk_chars`` characters at a time and reading stops once ``tokens`` are collected.
    """
    buffer: list[int] = []
    windows: list[list[int]] = []
    digest = hashlib.sha256()
    needed = tokens // seq_len
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            while len(windows) < needed:
                chunk = f.read(chunk_chars)
                if not chunk:
                    break
                buffer.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
                while len(buffer) >= seq_len and len(windows) < needed:
                    windows.append(buffer[:seq_len])
                    del buffer[:seq_len]
        if len(windows) >= needed:
            break
    if not windows:
        raise ValueError(f"the calibration files hold fewer than {seq_len} tokens; give more text or a shorter --seq-len")
    ids = torch.tensor(windows, dtype=torch.long)
    digest.update(ids.to(torch.int32).numpy().tobytes())
    record = {"files": [str(p) for p in files], "tokens": ids.numel(), "windows": len(windows), "sha256": digest.hexdigest()}
    return ids, record


def _hidden(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    state = getattr(block, STATE_ATTR)
    return bind_call(state.signature, block, args, kwargs)[state.spec.hidden]


def _loss(model: nn.Module, ids: torch.Tensor) -> float:
    return float(model(input_ids=ids, labels=ids, use_cache=False).loss)


@contextlib.contextmanager
def _replay(blocks: Sequence[nn.Module], cached: Sequence[Any]) -> Iterator[None]:
    """Blocks return their cached dense outputs instead of computing them."""
    for block, out in zip(blocks, cached):
        block.forward = types.MethodType(lambda self, *a, _out=out, **k: _out, block)  # type: ignore[method-assign]
    try:
        yield
    finally:
        from modify.routing import routed_forward

        for block in blocks:
            block.forward = types.MethodType(routed_forward, block)  # type: ignore[method-assign]


def calibrate(
    model: nn.Module,
    windows: torch.Tensor,
    data: dict[str, Any],
    settings: CalibrationSettings,
    progress: Callable[[str, int, int], None] | None = None,
) -> Calibration:
    """Calibrate ``model`` (left dense and unchanged) on token ``windows``; see the module docstring."""
    report = progress or (lambda stage, done, total: None)
    torch.manual_seed(settings.seed)
    convert(model, capacity=1.0, layers="all", keep_first=settings.keep_first)
    try:
        return _calibrate(model, windows, data, settings, report)
    finally:
        revert(model)


def _calibrate(model: nn.Module, windows: torch.Tensor, data: dict[str, Any], s: CalibrationSettings, report: Callable) -> Calibration:
    _, stack = find_block_stack(model)
    blocks = list(stack)
    states = [getattr(b, STATE_ATTR) for b in blocks]
    for st in states:
        st.enabled = False
    n, dim = len(blocks), states[0].spec.hidden_size
    sens_count = max(1, min(len(windows), s.sensitivity_tokens // s.seq_len))
    sens_index = sorted(random.Random(s.seed).sample(range(len(windows)), sens_count))
    sens_set = set(sens_index)

    # Dense pass: normal equations for the routers, importance and outputs on the sensitivity windows.
    gram = torch.zeros(n, dim + 1, dim + 1, dtype=torch.float64)
    moment = torch.zeros(n, dim + 1, dtype=torch.float64)
    sens_importance: list[list[torch.Tensor]] = [[] for _ in blocks]
    sens_inputs: list[list[torch.Tensor]] = [[] for _ in blocks]
    sens_outputs: list[list[Any]] = [[] for _ in blocks]
    keep = {"sens": False}

    def hook(i: int) -> Callable:
        def fn(block: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = _hidden(block, args, kwargs)
            y = out[0] if isinstance(out, tuple) else out
            importance = (y - x).float().norm(dim=-1).clamp_min(1e-12).log()  # [B, T]
            feats = torch.cat([x.float().reshape(-1, dim), torch.ones(x.shape[0] * x.shape[1], 1)], dim=1).double()
            gram[i] += feats.T @ feats
            moment[i] += feats.T @ importance.reshape(-1).double()
            if keep["sens"]:
                sens_importance[i].append(importance)
                sens_inputs[i].append(x)
                sens_outputs[i].append(out)

        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    dense_losses: list[float] = []
    # Sensitivity windows go in batches of their own, so that their cached activations line up.
    sens_batches = [sens_index[i : i + s.batch_size] for i in range(0, len(sens_index), s.batch_size)]
    other = [w for w in range(len(windows)) if w not in sens_set]
    batches = sens_batches + [other[i : i + s.batch_size] for i in range(0, len(other), s.batch_size)]
    try:
        with torch.no_grad():
            for done, batch in enumerate(batches):
                keep["sens"] = done < len(sens_batches)
                loss = _loss(model, windows[batch])
                if keep["sens"]:
                    dense_losses.append(loss)
                report("dense pass", done + 1, len(batches))
    finally:
        for h in handles:
            h.remove()
    dense_loss = sum(dense_losses) / len(dense_losses)

    # Routers: ridge regression from x to log-importance.
    routers: dict[int, dict[str, torch.Tensor]] = {}
    for i in range(n):
        ridge = 1e-6 * gram[i].diagonal().mean() * torch.eye(dim + 1, dtype=torch.float64)
        ridge[dim, dim] = 0
        solution = torch.linalg.solve(gram[i] + ridge, moment[i])
        routers[i] = {"weight": solution[:dim].float().unsqueeze(0), "bias": solution[dim:].float(), "scale": torch.zeros(1)}

    # Sensitivity: block i skipped, or routing its most important tokens at each capacity of the grid.
    variants = [0.0] + sorted((c for c in s.grid if c < 1.0), reverse=True)
    sensitivity: dict[str, dict[str, float]] = {}
    width = _attention_width(model)
    with torch.no_grad():
        for i, block in enumerate(blocks):
            router = getattr(block, ROUTER_ATTR)
            row = {}
            for c in variants:
                losses = []
                for b, batch in enumerate(sens_batches):
                    oracle = sens_importance[i][b]
                    hook_handle = router.register_forward_hook(lambda m, a, out, _o=oracle: _o)
                    with _replay(blocks[:i], [sens_outputs[j][b] for j in range(i)]), _variant(block, states[i], c, router):
                        losses.append(_loss(model, windows[batch]))
                    hook_handle.remove()
                row[f"{c:g}"] = sum(losses) / len(losses) - dense_loss
            row["1"] = 0.0
            sensitivity[str(i)] = row
            report("sensitivity", i + 1, n)

    grid = sorted(set(s.grid), reverse=True)
    costs = []
    for block in blocks:
        router_cost = 2 * dim * s.seq_len
        costs.append({c: float(block_flops(block, width, capacity_tokens(c, s.seq_len)) + (router_cost if c < 1 else 0)) for c in grid})
    loss_tables = [{c: sensitivity[str(i)][f"{c:g}"] for c in grid} for i in range(n)]
    chosen = plan_under_budget(loss_tables, costs, s.budget)

    # Overlap of each routed block's fitted top-k with the oracle's, on the sensitivity windows.
    overlap = {}
    for i, c in enumerate(chosen.capacities):
        if c < 1.0:
            hits, total = 0, 0
            for x, oracle in zip(sens_inputs[i], sens_importance[i]):
                r = torch.nn.functional.linear(x.float(), routers[i]["weight"], routers[i]["bias"]).squeeze(-1)
                k = capacity_tokens(c, x.shape[1])
                fitted, best = select_tokens(r, k, keep_first=s.keep_first), select_tokens(oracle, k, keep_first=s.keep_first)
                hits += sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(fitted, best))
                total += fitted.numel()
            overlap[str(i)] = hits / total

    result = Calibration(
        settings={**asdict(s), "grid": list(s.grid)},
        data=data,
        num_blocks=n,
        capacities=list(chosen.capacities),
        sensitivity=sensitivity,
        cost_ratio=chosen.cost_ratio,
        predicted_loss_increase=chosen.predicted_loss_increase,
        dense_loss=dense_loss,
        measured_loss=math.nan,
        measured_loss_untrained_routers=math.nan,
        router_overlap=overlap,
        routers={i: routers[i] for i in chosen_routed(chosen.capacities)},
    )
    # Measure the chosen plan on the sensitivity windows, with fitted and with zero routers.
    for st in states:
        st.enabled = True
        st.capacity = 1.0
    with torch.no_grad():
        for fitted in (True, False):
            for i, block in enumerate(blocks):
                states[i].capacity = chosen.capacities[i]
                states[i].enabled = chosen.capacities[i] < 1.0
                _load_router(getattr(block, ROUTER_ATTR), routers[i] if fitted else None)
            measured = sum(_loss(model, windows[b]) for b in sens_batches) / len(sens_batches)
            if fitted:
                result.measured_loss = measured
            else:
                result.measured_loss_untrained_routers = measured
    return result


def chosen_routed(capacities: Sequence[float]) -> list[int]:
    return [i for i, c in enumerate(capacities) if c < 1.0]


def _load_router(router: nn.Module, values: dict[str, torch.Tensor] | None) -> None:
    with torch.no_grad():
        for name, param in router.named_parameters():
            if values is None:
                param.fill_(1.0 if name == "scale" else 0.0)
            else:
                param.copy_(values[name].to(param.device, param.dtype))


@contextlib.contextmanager
def _variant(block: nn.Module, state: Any, capacity: float, router: nn.Module) -> Iterator[None]:
    """Block skipped (capacity 0) or routed at ``capacity`` with its gate held at exactly 1."""
    saved_scale = router.scale.detach().clone()
    if capacity == 0.0:
        spec = state.spec

        def identity(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            x = bind_call(state.signature, self, args, kwargs)[spec.hidden]
            return (x,) if spec.output_is_tuple else x

        block.forward = types.MethodType(identity, block)  # type: ignore[method-assign]
    else:
        state.enabled, state.capacity = True, capacity
        with torch.no_grad():
            router.scale.zero_()
    try:
        yield
    finally:
        from modify.routing import routed_forward

        block.forward = types.MethodType(routed_forward, block)  # type: ignore[method-assign]
        state.enabled, state.capacity = False, 1.0
        with torch.no_grad():
            router.scale.copy_(saved_scale)


def apply_calibration(model: nn.Module, calibration: Calibration) -> nn.Module:
    """Convert ``model`` with the calibrated plan and load the fitted routers (gate scale 0: gates are 1)."""
    convert(model, plan=calibration.plan())
    for block, state in routed_blocks(model):
        _load_router(getattr(block, ROUTER_ATTR), calibration.routers[state.index])
    return model
