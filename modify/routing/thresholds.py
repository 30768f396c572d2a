"""The running decision threshold, one rule for the causal "threshold" rule and the MoDE no-op expert.

A threshold lives in a float32 buffer of its module (the router's, the no-op expert's), so it is saved with the
weights and moves in place without a host sync (``torch.compile`` keeps one graph). It is NaN until it has
seen text: the first batch's quantile starts it (:func:`start`), and in training each batch's quantile moves
it by an exponential average with one momentum (:func:`follow`). Fitting on calibration text replaces it
(``modify.fit_thresholds``).
"""

from __future__ import annotations

import torch

__all__ = ["MOMENTUM", "quantile_of", "start", "follow"]

#: Weight of each training batch's quantile in a running threshold.
MOMENTUM = 0.05


def quantile_of(values: torch.Tensor, decided: torch.Tensor, level: float) -> torch.Tensor:
    """The ``level`` quantile of ``values`` where ``decided`` is True (a 0-d float32 tensor); NaN when none is.
    Masks rather than boolean indexing: static shapes, no host sync."""
    return torch.nanquantile(values.detach().float().masked_fill(~decided, float("nan")), level)


def start(threshold: torch.Tensor, quantile: torch.Tensor) -> None:
    """Set an unfitted (NaN) ``threshold`` to ``quantile``; a fitted one stays."""
    threshold.copy_(torch.where(threshold.isnan(), quantile, threshold))


def follow(threshold: torch.Tensor, quantile: torch.Tensor) -> None:
    """Move ``threshold`` towards ``quantile`` by :data:`MOMENTUM` (start it if unfitted); a NaN quantile (no
    token decided) leaves it."""
    moved = torch.where(threshold.isnan(), quantile, threshold + MOMENTUM * (quantile - threshold))
    threshold.copy_(torch.where(quantile.isnan(), threshold, moved))
