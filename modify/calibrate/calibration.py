"""Calibration: measure how much each block tolerates routing, plan capacities under a FLOP budget, and
initialise the routers, all from text run through the dense model.

1. **Data.** Text files are streamed (read and tokenised a chunk at a time, never loaded whole) into windows of
   ``seq_len`` tokens until ``tokens`` are collected. The token stream's SHA-256 is the data fingerprint.
2. **Dense pass** over every window, with hooks on the blocks: each block's input x and contribution Δ.
   A token's *importance* for a block is log ‖Δ‖: how much the block changes it.
3. **Sensitivity**, on a seeded subset of ``sensitivity_tokens`` tokens: the loss increase when block i is
   removed (capacity 0: skipped by every token), and when it routes only the most important fraction c of
   tokens for each c of the grid (its true routed forward, with the importance as an oracle router and the
   gate held at 1). Blocks before i replay their cached dense outputs, so each measurement costs only the
   blocks from i on.
4. **Plan**: :func:`modify.calibrate.planning.plan_under_budget` picks the capacities minimising the predicted loss
   increase, Σ_i ΔL_i(c_i), under the FLOP budget; removal (capacity 0, costing nothing) is one of the options
   unless ``removal`` says otherwise ("only": the static baseline, each block kept or removed; "never"). The
   prediction assumes the blocks' effects add up; they compound instead. Each optional refinement round
   measures every block's tables again with the other blocks routed as planned (fitted routers) and plans
   again on them, keeping the new plan only if it measures better. The report gives each round's predicted
   and measured increase.
5. **Skip paths** (optional, :mod:`modify.routing.skip_path`): with candidates besides ``identity``, a second pass
   fits each block's skip paths for every grid capacity on the tokens the fitted router skips there
   (:mod:`modify.calibrate.skip_fit`); the sensitivity is measured for each (capacity, skip path) option and
   the planner chooses among them with each path's FLOPs counted.
6. **Routers**: each routed block's router is fitted by ridge regression from x (float64 normal equations,
   accumulated over the dense pass) to the importance, so its top-k picks the tokens that matter to that
   block. Its gate scale starts at 0, so every gate is exactly 1 and capacity 1.0 still reproduces the
   model. The report gives, per block, how many of the router's top-k tokens are the oracle's.

Everything is deterministic for a seed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modify.api import convert, routed_blocks
from modify.calibrate.dense_pass import IMPORTANCE_KINDS, DensePass, dense_pass
from modify.calibrate.measure import (
    load_router,
    option_key,
    plan_loss,
    refined_tables,
    sensitivity_tables,
    set_plan,
)
from modify.calibrate.planning import (
    DEFAULT_GRID,
    REMOVAL_MODES,
    BudgetPlan,
    Option,
    option_kv,
    plan_under_budget,
    restrict_removal,
)
from modify.calibrate.skip_fit import NormalSums, attach_skip, features, fit_skip_paths
from modify.config import MoDConfig
from modify.flops import block_flops, routed_block_flops
from modify.io.checkpoint import file_record
from modify.modes import fit_thresholds
from modify.passes.find_block_stack import find_block_stack
from modify.routing import STATE_ATTR, capacity_tokens, select_tokens
from modify.routing.kv_all import KV_OPTIONS
from modify.routing.router import ROUTER_ATTR
from modify.routing.skip_path import SKIP_ATTR, parse_spec

__all__ = [
    "CalibrationSettings",
    "Calibration",
    "token_windows",
    "calibrate",
    "apply_calibration",
    "fit_router",
    "grid_costs",
    "option_costs",
    "loss_tables",
    "replan",
    "load_router",
    "option_key",
]

_CHUNK_CHARS = 1 << 20


@dataclass(frozen=True)
class CalibrationSettings:
    """What calibration runs on.

    Attributes:
        tokens: calibration tokens for the dense pass and the router fit.
        seq_len: tokens per window (the FLOP budget is met at this length).
        budget: F in (0, 1): routed blocks cost at most F times the dense blocks' forward FLOPs.
        grid: capacities the planner may choose (1.0 = not routed, 0.0 = removed; ``removal`` adds or drops 0).
        sensitivity_tokens: tokens on which each block's tolerance is measured.
        batch_size: windows per forward.
        seed: picks the sensitivity windows.
        keep_first: leading tokens every routed block always processes (1: the attention sink).
        refine_rounds: after the first plan, measure every block's loss increase again with the other blocks
            routed as planned (fitted routers), and plan again on those tables; keeps the better plan. Off by
            default: on SmolLM2-135M one round cost 137 s and its plan measured worse (+0.819 vs +0.809 nats).
        skip_paths: skip paths the planner may give a routed block, as specs ("identity", "linear-32",
            "mlp-64"; see :mod:`modify.routing.skip_path`); "identity" (pure Mixture-of-Depths) is always one of them.
        dtype: dtype of the copy of the model that calibration runs ("bfloat16": about 3.7x faster than
            float32 on CPUs with AMX, as measured on SmolLM2-135M here; the model passed in is not touched).
        removal: "allow" (capacity 0 on the grid: removal competes with routing and skip paths under the same
            budget), "only" (each block kept dense or removed, nothing routed: ShortGPT's static baseline, which
            ``modify export`` writes as a plain checkpoint with fewer layers) or "never" (0 off the grid).
        kv: what a routed block's skipped tokens may leave in its attention, the planner measuring each: "routed"
            (nothing: the paper's rule), "all" (their keys and values, :mod:`modify.routing.kv_all`), or both,
            when it chooses per block.
        importance: what a token's importance for a block is, which the routers are fitted to and the
            sensitivity's oracle routes by: "norm", log ‖Δ‖ (how much the block changes the token), or "grad",
            asinh(−⟨∂L/∂y, Δ⟩), the first-order increase of the loss if the block skipped the token, from one
            dense backward per batch (about 3× the dense pass's time).
    """

    tokens: int = 65536
    seq_len: int = 512
    budget: float = 0.75
    grid: tuple[float, ...] = DEFAULT_GRID
    sensitivity_tokens: int = 2048
    batch_size: int = 4
    seed: int = 0
    keep_first: int = 1
    refine_rounds: int = 0
    skip_paths: tuple[str, ...] = ("identity",)
    dtype: str = "bfloat16"
    removal: str = "allow"
    importance: str = "norm"
    kv: tuple[str, ...] = ("routed",)

    def __post_init__(self) -> None:
        if not self.kv or any(k not in KV_OPTIONS for k in self.kv):
            raise ValueError(f"kv options {self.kv} must be some of {', '.join(KV_OPTIONS)}")
        if self.importance not in IMPORTANCE_KINDS:
            raise ValueError(f"unknown importance {self.importance!r}; choose one of {', '.join(IMPORTANCE_KINDS)}")
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"calibration dtype {self.dtype!r} must be bfloat16, float32 or float16")
        if self.seq_len < 2 or self.tokens < self.seq_len:
            raise ValueError(f"need seq_len >= 2 and tokens >= seq_len, got {self.seq_len} and {self.tokens}")
        if 1.0 not in self.grid or any(not 0 <= c <= 1 for c in self.grid):
            raise ValueError(f"the grid {self.grid} must hold capacities in [0, 1], 1.0 (not routed) included")
        for spec in self.skip_paths:
            parse_spec(spec)
        object.__setattr__(self, "skip_paths", tuple(dict.fromkeys(("identity", *self.skip_paths))))
        if self.removal not in REMOVAL_MODES:
            raise ValueError(f"unknown removal mode {self.removal!r}; choose one of {', '.join(REMOVAL_MODES)}")
        if self.removal == "only" and len(self.skip_paths) > 1:
            raise ValueError(
                "removal 'only' removes blocks outright, with no skip path; drop the skip path, or allow removal "
                "beside routing ('allow') to let the planner give a removed block a skip path"
            )
        # The grid says which capacities route; whether 0 (removal) is an option is the removal mode's to say.
        routed = {1.0} if self.removal == "only" else set(self.grid) - {0.0}
        grid = routed | ({0.0} if self.removal != "never" else set())
        object.__setattr__(self, "grid", tuple(sorted(grid, reverse=True)))


@dataclass
class Calibration:
    """The result: the plan and everything needed to reproduce and judge it.

    ``routers`` maps block index -> {"weight", "bias", "scale"} tensors and ``skips`` block index -> the
    weights of its fitted skip path; the rest is JSON-serialisable. ``skip_paths`` holds each block's skip
    path spec ("identity" where it has none) and ``skip_fit`` each fitted path's R² on the tokens it skips.
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
    rounds: list[dict[str, Any]] = field(default_factory=list)
    skip_paths: list[str] = field(default_factory=list)
    kv: list[str] = field(default_factory=list)
    skip_fit: dict[str, float] = field(default_factory=dict)
    #: block index -> the "threshold" causal rule's threshold: the (1 - c) quantile of its router's scores
    thresholds: dict[str, float] = field(default_factory=dict)
    routers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    skips: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    #: In memory only: every block's fitted router ("routers": index -> values) and every candidate skip path
    #: ("skips": (index, capacity, spec) -> weights), to plan again with fewer candidates without measuring again.
    candidates: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def routed(self) -> list[int]:
        return [i for i, c in enumerate(self.capacities) if c < 1.0]

    def plan(self) -> MoDConfig:
        return MoDConfig(
            self.num_blocks,
            self.routed,
            [self.capacities[i] for i in self.routed],
            keep_first=self.settings["keep_first"],
            skip_paths=[self.skip_paths[i] if self.skip_paths else "identity" for i in self.routed],
            kv=[self.kv[i] if self.kv else "routed" for i in self.routed],
            thresholds=[self.thresholds.get(str(i)) for i in self.routed],
            calibration=self.to_dict(),
        )

    def to_dict(self) -> dict[str, Any]:
        tensors = ("routers", "skips", "candidates")
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in tensors}


def token_windows(
    tokenizer: Any, files: Sequence[Path], seq_len: int, tokens: int, chunk_chars: int = _CHUNK_CHARS
) -> tuple[torch.Tensor, dict[str, Any]]:
    """[N, seq_len] token windows streamed from ``files`` in order, and the data record: the fingerprint, and
    each file by name, size and SHA-256 (not by path, which a published plan would carry).

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
        raise ValueError(
            f"the calibration files hold fewer than {seq_len} tokens; give more text or a shorter --seq-len"
        )
    ids = torch.tensor(windows, dtype=torch.long)
    digest.update(ids.to(torch.int32).numpy().tobytes())
    record = {
        "files": [file_record(Path(p)) for p in files],  # name, size, SHA-256: never a local path
        "tokens": ids.numel(),
        "windows": len(windows),
        "sha256": digest.hexdigest(),
    }
    return ids, record


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
    work = copy.deepcopy(model).to(getattr(torch, settings.dtype)).eval()
    # Converted with kv="all" when it is a candidate, so every block's attention is split once; blocks run
    # whichever kv an option says (see measure.variant).
    kv = "all" if "all" in settings.kv else "routed"
    convert(work, capacity=1.0, layers="all", keep_first=settings.keep_first, kv=kv)
    return _calibrate(work, windows, data, settings, report)


def grid_costs(model: nn.Module, grid: Sequence[float], seq_len: int) -> list[dict[float, float]]:
    """Per block, capacity -> forward FLOPs at ``seq_len`` (routers included below 1.0): the planner's costs."""
    return [{c: table[c, "identity"] for c, _ in table} for table in option_costs(model, grid, seq_len, ("identity",))]


def option_costs(
    model: nn.Module, grid: Sequence[float], seq_len: int, specs: Sequence[str], kvs: Sequence[str] = ("routed",)
) -> list[dict[Option, float]]:
    """Per block, (capacity, skip path) -> forward FLOPs at ``seq_len``, skip path included, and (capacity, skip
    path, "all") for ``kv="all"`` among ``kvs`` (the model converted with it): the planner's costs. Capacity 1.0
    appears once, as (1.0, "identity"); capacity 0 only without kv (no token is routed)."""
    _, stack = find_block_stack(model)
    tables = []
    for i in range(len(stack)):
        table: dict[Option, float] = {(1.0, "identity"): float(block_flops(model, i, seq_len))} if 1.0 in grid else {}
        for c in (c for c in grid if c < 1):
            for spec in specs:
                for kv in kvs if c > 0 else ("routed",):
                    option = (c, spec) if kv == "routed" else (c, spec, kv)
                    table[option] = float(routed_block_flops(model, i, c, seq_len, spec, kv=kv))
        tables.append(table)
    return tables


def loss_tables(
    sensitivity: dict[str, dict[str, float]], costs: list[dict[Option, float]]
) -> list[dict[Option, float]]:
    """The planner's loss tables: each block's measured loss increase for each option of ``costs`` (0 when dense)."""
    return [
        {o: sensitivity[str(i)][option_key(*o)] if o[0] < 1 else 0.0 for o in table} for i, table in enumerate(costs)
    ]


def replan(
    calibration: Calibration,
    model: nn.Module,
    budget: float,
    seq_len: int,
    specs: Sequence[str] = ("identity",),
    removal: str = "allow",
) -> BudgetPlan:
    """The planner's choice under ``budget`` from a calibration's measurements, with only the skip paths
    ``specs`` as candidates and removal as ``removal`` allows (re-planning with fewer candidates is what
    calibrating with fewer computes). Removal ("0") is measured by every calibration, on the grid or not."""
    grid = sorted(set(calibration.settings["grid"]) | ({0.0} if removal != "never" else set()), reverse=True)
    kvs = calibration.settings.get("kv", ("routed",))
    costs = restrict_removal(option_costs(model, grid, seq_len, specs, kvs), removal)
    return plan_under_budget(loss_tables(calibration.sensitivity, costs), costs, budget)


def fit_router(gram: torch.Tensor, moment: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ridge regression from [x, 1] to a per-token target, from Σ [x,1]ᵀ[x,1] and Σ [x,1]ᵀ target.

    The bias is not penalised; the gate scale is 0, so the fitted router's gates are exactly 1.
    """
    dim = gram.shape[0] - 1
    ridge = 1e-6 * gram.diagonal().mean() * torch.eye(dim + 1, dtype=torch.float64)
    ridge[dim, dim] = 0
    solution = torch.linalg.solve(gram + ridge, moment)
    return {"weight": solution[:dim].float().unsqueeze(0), "bias": solution[dim:].float(), "scale": torch.zeros(1)}


def _overlap(
    dense: DensePass, routers: dict[int, dict[str, torch.Tensor]], capacities: Sequence[float], keep_first: int
) -> dict[str, float]:
    """Per routed block: the share of the fitted router's top-k that is also the oracle's top-k."""
    overlap = {}
    for i, c in enumerate(capacities):
        if 0.0 < c < 1.0:  # a removed block routes no token: nothing to compare
            hits = total = 0
            for x, oracle in zip(dense.inputs[i], dense.importance[i]):
                r = torch.nn.functional.linear(x.float(), routers[i]["weight"], routers[i]["bias"]).squeeze(-1)
                k = capacity_tokens(c, x.shape[1])
                fitted, best = (
                    select_tokens(r, k, keep_first=keep_first),
                    select_tokens(oracle, k, keep_first=keep_first),
                )
                hits += sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(fitted, best))
                total += fitted.numel()
            overlap[str(i)] = hits / total
    return overlap


def _calibrate(
    model: nn.Module, windows: torch.Tensor, data: dict[str, Any], s: CalibrationSettings, report: Callable
) -> Calibration:
    _, stack = find_block_stack(model)
    blocks = list(stack)
    states = [getattr(b, STATE_ATTR) for b in blocks]
    for st in states:
        st.enabled = False
    n, dim = len(blocks), states[0].spec.hidden_size
    sens_count = max(1, min(len(windows), s.sensitivity_tokens // s.seq_len))
    sens_index = sorted(random.Random(s.seed).sample(range(len(windows)), sens_count))
    sens_batches = [sens_index[i : i + s.batch_size] for i in range(0, len(sens_index), s.batch_size)]
    other = [w for w in range(len(windows)) if w not in set(sens_index)]
    other_batches = [other[i : i + s.batch_size] for i in range(0, len(other), s.batch_size)]

    grid = sorted(set(s.grid), reverse=True)
    costs = option_costs(model, grid, s.seq_len, s.skip_paths, s.kv)
    options = list(costs[0])
    # A budget no plan can meet (or one that routes nothing) fails here, before minutes of measurement.
    plan_under_budget([{o: 0.0 for o in table} for table in costs], costs, s.budget)
    with_mlp = any(parse_spec(spec)[0] == "mlp" for spec in s.skip_paths)
    all_tokens = [NormalSums.zeros(1, dim + 1, dim) for _ in blocks] if with_mlp else []

    def normed_sums(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        n = states[i].skip_input(blocks[i], x).float().reshape(-1, dim)
        all_tokens[i].add(0, features(n), (y.float() - x.float()).reshape(-1, dim))

    dense = dense_pass(
        model, blocks, windows, sens_batches, other_batches, dim, report, normed_sums if with_mlp else None,
        importance_kind=s.importance,
    )  # fmt: skip
    routers = {i: fit_router(dense.gram[i], dense.moment[i]) for i in range(n)}
    fits: dict[tuple[int, float, str], dict[str, torch.Tensor]] = {}
    r2: dict[tuple[int, float, str], float] = {}
    if len(s.skip_paths) > 1:
        fits, r2 = fit_skip_paths(
            model,
            blocks,
            states,
            windows,
            sens_batches + other_batches,
            routers,
            all_tokens,
            s.skip_paths,
            s.grid,
            s.keep_first,
            report,
        )
    sensitivity = sensitivity_tables(
        model, blocks, states, windows, sens_batches, dense, s.grid, s.skip_paths, fits, report, s.kv
    )

    chosen = plan_under_budget(loss_tables(sensitivity, costs), costs, s.budget)
    set_plan(blocks, states, chosen.capacities, routers, fits)
    measured = plan_loss(model, windows, sens_batches)

    def record(plan: Sequence[Option], predicted: float, loss: float) -> dict[str, Any]:
        return {
            "capacities": [o[0] for o in plan],
            "skip_paths": [o[1] for o in plan],
            "kv": [option_kv(o) for o in plan],
            "predicted": predicted,
            "measured": loss - dense.loss,
        }

    rounds = [record(chosen.capacities, chosen.predicted_loss_increase, measured)]
    for _ in range(s.refine_rounds):
        tables = refined_tables(
            model, blocks, states, windows, sens_batches, routers, fits, chosen.capacities, options, report
        )
        candidate = plan_under_budget(tables, costs, s.budget)
        # Linearised around the current plan: its measured increase plus the change of the refined terms.
        predicted = (
            measured - dense.loss + sum(t[c] - t[p] for t, c, p in zip(tables, candidate.capacities, chosen.capacities))
        )
        set_plan(blocks, states, candidate.capacities, routers, fits)
        candidate_loss = plan_loss(model, windows, sens_batches)
        rounds.append(record(candidate.capacities, predicted, candidate_loss))
        if candidate_loss >= measured:
            break
        chosen = dataclasses.replace(candidate, predicted_loss_increase=predicted)
        measured = candidate_loss
    # The causal rule's thresholds, on the text the routers were fitted to, in the routed model (top-k).
    set_plan(blocks, states, chosen.capacities, routers, fits)
    fitted = fit_thresholds(model, (windows[b] for b in sens_batches + other_batches))
    # A removed block has no decision to make (no token runs it): no threshold.
    thresholds = {str(i): round(t, 6) for i, (t, o) in enumerate(zip(fitted, chosen.capacities)) if 0.0 < o[0] < 1.0}
    set_plan(blocks, states, chosen.capacities, None, fits)
    untrained = plan_loss(model, windows, sens_batches)
    capacities = [o[0] for o in chosen.capacities]
    paths = [o[1] for o in chosen.capacities]
    for block, state in zip(blocks, states):
        attach_skip(block, state, "identity", None)
    return Calibration(
        settings={**asdict(s), "grid": list(s.grid), "skip_paths": list(s.skip_paths)},
        data=data,
        num_blocks=n,
        capacities=capacities,
        sensitivity=sensitivity,
        cost_ratio=chosen.cost_ratio,
        predicted_loss_increase=chosen.predicted_loss_increase,
        dense_loss=dense.loss,
        measured_loss=measured,
        measured_loss_untrained_routers=untrained,
        rounds=rounds,
        router_overlap=_overlap(dense, routers, capacities, s.keep_first),
        skip_paths=paths,
        kv=[option_kv(o) for o in chosen.capacities],
        skip_fit={str(i): round(r2[i, o[0], o[1]], 4) for i, o in enumerate(chosen.capacities) if o[1] != "identity"},
        thresholds=thresholds,
        routers={i: routers[i] for i, c in enumerate(capacities) if c < 1.0},
        skips={i: fits[i, o[0], o[1]] for i, o in enumerate(chosen.capacities) if o[1] != "identity"},
        candidates={"routers": routers, "skips": fits, "r2": r2},
    )


def apply_calibration(model: nn.Module, calibration: Calibration, causal: str | None = None) -> nn.Module:
    """Convert ``model`` with the calibrated plan and load the fitted routers (gate scale 0: gates are 1) and
    skip paths; ``causal`` chooses the causal routing rule (by default the plan's thresholds)."""
    convert(model, plan=calibration.plan(), causal=causal)
    for block, state in routed_blocks(model):
        load_router(getattr(block, ROUTER_ATTR), calibration.routers[state.index])
        if state.index in calibration.skips:  # load_state_dict copies into the path's own device and dtype
            getattr(block, SKIP_ATTR).load_state_dict(calibration.skips[state.index])
    return model
