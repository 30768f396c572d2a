"""Step 2 of calibration: one dense pass over the windows, each block's input, its contribution Δ and each
token's importance for it (see :mod:`modify.calibrate.calibration`).

Importance is log ‖Δ‖ (how much the block changes the token) or, with ``importance_kind="grad"``,
asinh(−⟨∂L/∂y, Δ⟩), the first-order increase of the summed loss if the block skipped the token, from one
backward of the stream per batch (the weights get no gradient).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modify.calibrate.measure import measure_loss
from modify.calibrate.skip_fit import block_hidden

__all__ = ["IMPORTANCE_KINDS", "DensePass", "dense_pass"]


#: What a token's importance for a block is measured as (``CalibrationSettings.importance``).
IMPORTANCE_KINDS = ("norm", "grad")


@dataclass
class DensePass:
    """What one dense pass over the calibration windows leaves behind."""

    gram: torch.Tensor  # [n, D+1, D+1] float64: Σ [x, 1]ᵀ[x, 1] per block
    moment: torch.Tensor  # [n, D+1] float64: Σ [x, 1]ᵀ log‖Δ‖ per block
    loss: float = 0.0  # mean loss on the sensitivity windows
    importance: list[list[torch.Tensor]] = field(default_factory=list)  # per block, per sensitivity batch: [B, T]
    inputs: list[list[torch.Tensor]] = field(default_factory=list)  # per block, per sensitivity batch: [B, T, D]
    outputs: list[list[Any]] = field(default_factory=list)  # per block, per sensitivity batch: the block's output


def dense_pass(
    model: nn.Module,
    blocks: list[nn.Module],
    windows: torch.Tensor,
    sens_batches: list[list[int]],
    other_batches: list[list[int]],
    dim: int,
    report: Callable,
    extra: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    importance_kind: str = "norm",
) -> DensePass:
    """One pass over every window; ``extra(i, x, y)`` also sees each block's input and output hidden states.

    ``importance_kind``: "norm" (log ‖Δ‖) or "grad" (the first-order loss estimate; a backward per batch)."""
    n = len(blocks)
    dense = DensePass(
        torch.zeros(n, dim + 1, dim + 1, dtype=torch.float64),
        torch.zeros(n, dim + 1, dtype=torch.float64),
        importance=[[] for _ in blocks],
        inputs=[[] for _ in blocks],
        outputs=[[] for _ in blocks],
    )
    keep = {"sens": False}
    pending: dict[int, tuple[torch.Tensor, torch.Tensor, Any]] = {}

    def record(i: int, x: torch.Tensor, y: torch.Tensor, out: Any, importance: torch.Tensor) -> None:
        # float32 products per batch (a few thousand rows), summed across batches in float64.
        feats = torch.cat([x.float().reshape(-1, dim), torch.ones(x.shape[0] * x.shape[1], 1)], dim=1)
        dense.gram[i] += (feats.T @ feats).double()
        dense.moment[i] += (feats.T @ importance.reshape(-1, 1)).squeeze(-1).double()
        if extra is not None:
            extra(i, x, y)
        if keep["sens"]:
            dense.importance[i].append(importance)
            dense.inputs[i].append(x)
            dense.outputs[i].append(out)

    def hook(i: int) -> Callable:
        def fn(block: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = block_hidden(block, args, kwargs)
            y = out[0] if isinstance(out, tuple) else out
            if importance_kind == "grad":
                y.retain_grad()
                pending[i] = (x.detach(), y, out)
                return
            record(i, x, y, out, (y - x).float().norm(dim=-1).clamp_min(1e-12).log())  # [B, T]

        return fn

    def first_order(ids: torch.Tensor) -> float:
        """One dense forward and backward: each token's importance for block i is asinh(−⟨∂L/∂y_i, Δ_i⟩), the
        first-order increase of the summed loss if the block left that token out."""
        with torch.enable_grad():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss * ids[:, 1:].numel()).backward()
        for i, (x, y, out) in pending.items():
            delta = (y.detach() - x).float()
            importance = torch.asinh(-(y.grad.float() * delta).sum(-1))
            y = y.detach()
            record(i, x, y, (y, *out[1:]) if isinstance(out, tuple) else y, importance)
        pending.clear()
        return float(loss)

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if importance_kind == "grad":  # the stream must be in a graph for ∂L/∂y, the weights need not be
        embed = model.get_input_embeddings()
        handles.append(embed.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True)))
        model.requires_grad_(False)
    losses = []
    batches = sens_batches + other_batches  # sensitivity windows first, in batches of their own
    try:
        with torch.no_grad():
            for done, batch in enumerate(batches):
                keep["sens"] = done < len(sens_batches)
                ids = windows[batch]
                loss = first_order(ids) if importance_kind == "grad" else measure_loss(model, ids)
                if keep["sens"]:
                    losses.append(loss)
                report("dense pass", done + 1, len(batches))
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
    dense.loss = sum(losses) / len(losses)
    return dense
