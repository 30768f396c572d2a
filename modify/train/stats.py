"""Per routed block, what its router did in a training step, and an alarm when routing collapses.

For each routed block and step (the last micro-batch of the step):

- ``gate``: the mean gate g(r) over the tokens the block processed;
- ``entropy``: the entropy of softmax(scores) over each sequence, divided by log T and averaged: 1.0 means
  every token scores alike (the router does not discriminate), lower means a few tokens dominate. The
  leading ``keep_first`` tokens are left out: they are always kept, and the first token's hidden state (the
  attention sink) is so large that its score would dominate. The measure depends on the scores' scale, which
  top-k does not: a calibrated router, whose scores estimate log ‖Δ‖, sits near 0 while choosing well;
- ``overlap``: the share of kept positions that the block also kept the step before (on another batch). A
  router that reads content keeps about its capacity of the same positions by chance; one that has frozen
  onto fixed positions keeps all of them.

A block *collapses* when, for ``patience`` steps in a row once its capacity is below 1, its scores are all
equal (spread under 1e-6) or its kept set is frozen (overlap at least 0.99 at a capacity of at most 0.9).
The monitor says so once per block.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from modify.api import routed_blocks

__all__ = ["RoutingMonitor", "BlockStats"]

_FLAT = 1e-6
_FROZEN = 0.99


@dataclass
class BlockStats:
    gate: float = math.nan
    entropy: float = math.nan
    overlap: float = math.nan
    spread: float = math.nan
    previous: torch.Tensor | None = None
    flat_steps: int = 0
    frozen_steps: int = 0
    alarmed: bool = False
    seen: bool = field(default=False)


class RoutingMonitor:
    """Watches every routed block of ``model`` through its routing state's observer hook."""

    def __init__(self, model: nn.Module, patience: int = 20, warn: Callable[[str], None] = print) -> None:
        self.states = [state for _, state in routed_blocks(model)]
        self.stats = {state.index: BlockStats() for state in self.states}
        self.patience = patience
        self.warn = warn
        for state in self.states:
            state.observer = self._observer(state.index)

    @property
    def blocks(self) -> list[int]:
        return [state.index for state in self.states]

    def _observer(self, index: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]:
        state = next(st for st in self.states if st.index == index)

        def observe(scores: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor) -> None:
            s = self.stats[index]
            scores = scores.float()
            keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
            if s.previous is not None and s.previous.shape == keep.shape:
                s.overlap = float((keep & s.previous).sum(-1).float().div(idx.shape[-1]).mean())
            s.previous = keep
            scores = scores[:, state.keep_first :]
            length = scores.shape[-1]
            s.gate = float(gate.float().mean())
            if length > 1:
                p = torch.softmax(scores, dim=-1)
                entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1) / math.log(length)
                s.entropy = float(entropy.mean())
                s.spread = float((scores.amax(-1) - scores.amin(-1)).max())
            s.seen = True

        return observe

    def end_step(self, step: int) -> dict[str, float]:
        """The step's statistics as ``{"gate_3": ..., "entropy_3": ..., "overlap_3": ...}``; checks collapse."""
        row: dict[str, float] = {}
        for state in self.states:
            s = self.stats[state.index]
            row[f"gate_{state.index}"] = s.gate
            row[f"entropy_{state.index}"] = s.entropy
            row[f"overlap_{state.index}"] = s.overlap
            if not s.seen or state.capacity >= 1.0 or not state.enabled:
                s.flat_steps = s.frozen_steps = 0
                continue
            s.flat_steps = s.flat_steps + 1 if s.spread < _FLAT else 0
            frozen = state.capacity <= 0.9 and s.overlap >= _FROZEN
            s.frozen_steps = s.frozen_steps + 1 if frozen else 0
            if s.alarmed:
                continue
            if s.flat_steps >= self.patience:
                s.alarmed = True
                self.warn(
                    f"step {step}: routing collapse in block {state.index}: its router has scored every token "
                    f"alike for {s.flat_steps} steps, so it picks the first tokens, not the important ones "
                    "(raise --router-lr, or recalibrate the routers)"
                )
            elif s.frozen_steps >= self.patience:
                s.alarmed = True
                self.warn(
                    f"step {step}: routing collapse in block {state.index}: it has kept the same positions for "
                    f"{s.frozen_steps} steps whatever the text (overlap {s.overlap:.2f}); its router no longer "
                    "reads content (lower --lr / --router-lr, or use --capacity-anneal)"
                )
        return row

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Evaluation batches are not training steps: leave the statistics alone meanwhile."""
        for state in self.states:
            state.observer = None
        try:
            yield
        finally:
            for state in self.states:
                state.observer = self._observer(state.index)

    def close(self) -> None:
        for state in self.states:
            state.observer = None
