"""Fitting skip paths (:mod:`modify.routing.skip_path`) zero-shot, from the dense model's activations.

A skip path estimates a block's contribution Δ for the tokens the block will skip, from n, the block's input
after its own input norm. Both kinds are fitted by least squares, streamed as normal equations (float64 sums of
float32 products per batch), like the routers:

- ``linear-R``: reduced-rank regression. The ridge solution W of [n, 1] -> Δ, projected on the R leading
  principal directions V of its fitted values (eigenvectors of Wᵀ G W): down = W·V, up = Vᵀ.
- ``mlp-R``: the first layer is the R leading input directions of the same regression fitted on every token,
  standardised so that silu sees unit-variance inputs; the output layer is the ridge solution of
  [silu(fc1(n)), 1] -> Δ.

"The tokens the block will skip" depends on the capacity the planner has not chosen yet, so the second pass
sorts each token of each block into the lowest grid capacity at which the fitted router still routes it, and
sums the normal equations per such level: the tokens skipped at capacity c are the levels above c's, and
every capacity of the grid gets its own fit from one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modify.passes.probe_block_calls import bind_call
from modify.routing import STATE_ATTR, capacity_tokens, select_tokens
from modify.routing.skip_path import SKIP_ATTR, make_skip_path, parse_spec

__all__ = [
    "SkipStats",
    "NormalSums",
    "features",
    "fit_linear",
    "fit_mlp",
    "mlp_first_layer",
    "ridge_solve",
    "block_hidden",
    "attach_skip",
    "fit_skip_paths",
]

_RIDGE = 1e-4


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """argmin_W ‖F W - Y‖² + λ‖W‖² from G = FᵀF and C = FᵀY; the last feature (the constant) is not penalised."""
    dim = gram.shape[0]
    ridge = _RIDGE * gram.diagonal()[:-1].mean() * torch.eye(dim, dtype=gram.dtype)
    ridge[-1, -1] = 0
    return torch.linalg.solve(gram + ridge, cross)


def _r2(gram: torch.Tensor, cross: torch.Tensor, sq: float, w: torch.Tensor) -> float:
    """R² of predictions F·W against Y, from G, C, Σ‖Y‖² and the constant feature's sums (the last row)."""
    count = float(gram[-1, -1])
    if count == 0:
        return 0.0
    sse = sq - 2 * float((w * cross).sum()) + float((w * (gram @ w)).sum())
    mean = cross[-1] / count
    sst = sq - count * float((mean * mean).sum())
    return 1.0 - sse / sst if sst > 0 else 0.0


def _basis(gram: torch.Tensor, cross: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ridge solution W [D+1, D] and the principal directions of its fitted values, leading first."""
    w = ridge_solve(gram, cross)
    return w, torch.linalg.eigh(w.T @ gram @ w)[1].flip(-1)


def fit_linear(
    gram: torch.Tensor,
    cross: torch.Tensor,
    sq: float,
    rank: int,
    basis: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """Weights of a ``LinearSkipPath`` of ``rank`` and its R² on the fitted tokens (``basis`` from an earlier
    fit on the same sums saves the solve and the eigendecomposition)."""
    w, vectors = basis or _basis(gram, cross)
    v = vectors[:, :rank]  # [D, r]
    down = w @ v  # [D+1, r]
    state = {"down.weight": down[:-1].T.float(), "down.bias": down[-1].float(), "up.weight": v.float()}
    return state, _r2(gram, cross, sq, down @ v.T)


def mlp_first_layer(gram: torch.Tensor, cross: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
    """fc1 of an ``MLPSkipPath``: the ``width`` leading input directions of the regression, standardised."""
    w, vectors = _basis(gram, cross)
    a = w @ vectors[:, :width]  # [D+1, m]: z = [n, 1]·a
    count = gram[-1, -1]
    mean = (gram[-1] @ a) / count
    std = ((a * (gram @ a)).sum(0) / count - mean**2).clamp_min(1e-12).sqrt()
    return {"fc1.weight": (a[:-1] / std).T.float(), "fc1.bias": ((a[-1] - mean) / std).float()}


def fit_mlp(
    first: dict[str, torch.Tensor], gram: torch.Tensor, cross: torch.Tensor, sq: float
) -> tuple[dict[str, torch.Tensor], float]:
    """Weights of an ``MLPSkipPath`` (fc1 given, fc2 fitted from [h, 1] statistics) and its R²."""
    w = ridge_solve(gram, cross)  # [m+1, D]
    state = {**first, "fc2.weight": w[:-1].T.float(), "fc2.bias": w[-1].float()}
    return state, _r2(gram, cross, sq, w)


def features(values: torch.Tensor) -> torch.Tensor:
    """[N, d] float32 -> [N, d+1] with the constant feature last."""
    return torch.cat([values, torch.ones(values.shape[0], 1, dtype=values.dtype)], dim=1)


@dataclass
class NormalSums:
    """Σ FᵀF, Σ FᵀY and Σ‖Y‖² per level, in float64."""

    gram: torch.Tensor
    cross: torch.Tensor
    sq: torch.Tensor

    @classmethod
    def zeros(cls, levels: int, features: int, dim: int) -> NormalSums:
        return cls(
            torch.zeros(levels, features, features, dtype=torch.float64),
            torch.zeros(levels, features, dim, dtype=torch.float64),
            torch.zeros(levels, dtype=torch.float64),
        )

    def add(self, level: int, f: torch.Tensor, y: torch.Tensor) -> None:
        self.gram[level] += (f.T @ f).double()
        self.cross[level] += (f.T @ y).double()
        self.sq[level] += float((y.double() ** 2).sum())

    def above(self, level: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Sums over the levels above ``level``: the tokens skipped at that capacity."""
        return self.gram[level + 1 :].sum(0), self.cross[level + 1 :].sum(0), float(self.sq[level + 1 :].sum())


@dataclass
class SkipStats:
    """Normal equations for every block's skip paths, per capacity level.

    ``capacities`` are the grid's capacities below 1, ascending; level j < len(capacities) holds the tokens
    first routed at ``capacities[j]``, the last level the tokens routed at none of them. ``mlp_first`` holds,
    per mlp spec, each block's first layer (:func:`mlp_first_layer`), fixed before the pass.
    """

    capacities: list[float]
    num_blocks: int
    dim: int
    keep_first: int
    mlp_first: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict)
    linear: list[NormalSums] = field(init=False)
    mlp: dict[str, list[NormalSums]] = field(init=False)
    _bases: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        levels = len(self.capacities) + 1
        self.linear = [NormalSums.zeros(levels, self.dim + 1, self.dim) for _ in range(self.num_blocks)]
        self.mlp = {
            spec: [NormalSums.zeros(levels, parse_spec(spec)[1] + 1, self.dim) for _ in range(self.num_blocks)]
            for spec in self.mlp_first
        }

    def levels(self, scores: torch.Tensor) -> torch.Tensor:
        """[B, T] int: for each token, the index of the lowest capacity whose top-k holds it."""
        length = scores.shape[-1]
        level = torch.full(scores.shape, len(self.capacities), dtype=torch.long)
        for j in reversed(range(len(self.capacities))):
            idx = select_tokens(scores, capacity_tokens(self.capacities[j], length), keep_first=self.keep_first)
            level.scatter_(1, idx, j)
        return level

    def add(self, block: int, n: torch.Tensor, delta: torch.Tensor, scores: torch.Tensor) -> None:
        """Add one batch of block ``block``: normed inputs n and Δ [B, T, D], router scores [B, T]."""
        level = self.levels(scores).reshape(-1)
        f = features(n.float().reshape(-1, self.dim))
        y = delta.float().reshape(-1, self.dim)
        hidden = {}
        for spec, firsts in self.mlp_first.items():
            first = firsts[block]
            hidden[spec] = features(torch.nn.functional.silu(f[:, :-1] @ first["fc1.weight"].T + first["fc1.bias"]))
        # Level 0 is routed at every capacity: never skipped (empty when 0, removal, is on the grid: then the
        # fit for capacity 0 is over every token, as a removed block's path runs on every token).
        for j in range(1, len(self.capacities) + 1):
            rows = (level == j).nonzero().squeeze(-1)
            if rows.numel():
                self.linear[block].add(j, f[rows], y[rows])
                for spec, h in hidden.items():
                    self.mlp[spec][block].add(j, h[rows], y[rows])

    def fit(self, block: int, capacity: float, spec: str) -> tuple[dict[str, torch.Tensor], float]:
        """The skip path ``spec`` of ``block`` fitted on the tokens its router skips at ``capacity``, and its R²."""
        kind, rank = parse_spec(spec)
        level = self.capacities.index(capacity)
        if kind == "linear":
            sums = self.linear[block].above(level)
            if (block, level) not in self._bases:
                self._bases[block, level] = _basis(sums[0], sums[1])
            return fit_linear(*sums, rank, self._bases[block, level])
        return fit_mlp(self.mlp_first[spec][block], *self.mlp[spec][block].above(level))


def block_hidden(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a routed block was called with, from a forward hook's arguments."""
    state = getattr(block, STATE_ATTR)
    return bind_call(state.signature, block, args, kwargs)[state.spec.hidden]


def attach_skip(block: nn.Module, state: Any, spec: str, weights: dict[str, torch.Tensor] | None) -> None:
    """Give ``block`` the skip path ``spec`` with ``weights`` (none for identity), replacing any it has."""
    if hasattr(block, SKIP_ATTR):
        delattr(block, SKIP_ATTR)
    state.skip_path = spec
    first = next(block.parameters())
    path = make_skip_path(spec, state.spec.hidden_size, first.device, first.dtype)
    if path is not None:
        assert weights is not None, f"no fitted weights for skip path {spec} of block {state.index}"
        path.load_state_dict(weights)  # copied into the block's dtype
        block.add_module(SKIP_ATTR, path)


def _skip_pass(
    model: nn.Module,
    blocks: list[nn.Module],
    states: list[Any],
    windows: torch.Tensor,
    batches: list[list[int]],
    routers: dict[int, dict[str, torch.Tensor]],
    stats: SkipStats,
    report: Callable,
) -> None:
    """A second dense pass: each block's normed inputs and Δ, by the level at which its fitted router skips them."""

    def hook(i: int) -> Callable:
        def fn(block: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = block_hidden(block, args, kwargs)
            y = out[0] if isinstance(out, tuple) else out
            scores = torch.nn.functional.linear(x.float(), routers[i]["weight"], routers[i]["bias"]).squeeze(-1)
            stats.add(i, states[i].skip_input(block, x), y.float() - x.float(), scores)

        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for done, batch in enumerate(batches):
                model(input_ids=windows[batch], use_cache=False)
                report("fitting skip paths", done + 1, len(batches))
    finally:
        for h in handles:
            h.remove()


def fit_skip_paths(
    model: nn.Module,
    blocks: list[nn.Module],
    states: list[Any],
    windows: torch.Tensor,
    batches: list[list[int]],
    routers: dict[int, dict[str, torch.Tensor]],
    all_tokens: list[NormalSums],
    specs: Sequence[str],
    grid: Sequence[float],
    keep_first: int,
    report: Callable,
) -> tuple[dict[tuple[int, float, str], dict[str, torch.Tensor]], dict[tuple[int, float, str], float]]:
    """Every candidate skip path of every block at every grid capacity: (weights, R²) keyed (block, capacity, spec)."""
    specs = [spec for spec in specs if spec != "identity"]
    mlp_first = {
        spec: [mlp_first_layer(t.gram[0], t.cross[0], parse_spec(spec)[1]) for t in all_tokens]
        for spec in specs
        if parse_spec(spec)[0] == "mlp"
    }
    capacities = sorted(c for c in set(grid) if c < 1.0)
    stats = SkipStats(capacities, len(blocks), states[0].spec.hidden_size, keep_first, mlp_first)
    _skip_pass(model, blocks, states, windows, batches, routers, stats, report)
    fits, r2 = {}, {}
    for i in range(len(blocks)):
        for c in capacities:
            for spec in specs:
                fits[i, c, spec], r2[i, c, spec] = stats.fit(i, c, spec)
    return fits, r2
