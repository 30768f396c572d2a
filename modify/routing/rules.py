"""The causal selection rules: how a token decides alone whether a routed block processes it, and what teaches it.

Top-k over a sequence is not causal: whether token t is among a block's top k depends on the tokens after it.
Sampling needs a rule each token can apply alone (Raposo et al. 2024, section 3.5); the plan's ``causal``
names one (see :data:`modify.config.CAUSAL_RULES`):

- ``threshold``: process when the router score exceeds the block's threshold, the (1 - c) quantile of the
  scores on calibration text (``modify.fit_thresholds``), so the expected share processed is the capacity c;
  training moves it by running statistics (:mod:`modify.routing.thresholds`);
- ``aux``: process when the score is > 0, the router trained with a binary cross-entropy on its scores with
  top-k membership as targets;
- ``predictor``: process when a small MLP on the stop-gradient block input (:class:`modify.routing.router.MoDPredictor`)
  gives a logit > 0, trained on the same targets; the language-model loss never reaches it. Its logit adds
  the MLP's correction (zero at first) to the threshold rule's margin, so it starts where that rule is.

A rule returns a keep mask (:func:`causal_process`); it never runs the block. The losses are computed in the
top-k (training) forward (:func:`learn_from_topk`) and collected into the model's outputs by its output hook
(:mod:`modify.model_hooks`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modify.routing import thresholds
from modify.routing.router import PREDICTOR_ATTR
from modify.routing.selection import keep_mask

__all__ = ["decision_logits", "decision_threshold", "decide", "decided_tokens", "causal_process", "learn_from_topk"]


def decision_logits(state: Any, block: nn.Module, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """[B, T] what a token's decision compares with the threshold: the predictor's logit (which starts from the
    threshold rule's margin), else the router score."""
    if state.causal == "predictor":
        return getattr(block, PREDICTOR_ATTR)(x, scores - state.router.threshold)
    return scores


def decision_threshold(state: Any) -> torch.Tensor | float:
    return state.router.threshold if state.causal == "threshold" else 0.0


def decide(state: Any, block: nn.Module, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the causal rule's decision for every token (before padding and the leading tokens)."""
    return decision_logits(state, block, x, scores) > decision_threshold(state)


def decided_tokens(state: Any, real: torch.Tensor, seen: torch.Tensor | int = 0) -> torch.Tensor:
    """[B, T] bool: the real tokens a rule decides, the always-processed leading ones left out (``seen``: real
    tokens before these, per row)."""
    seen = seen[:, None] if torch.is_tensor(seen) else seen
    return real & (seen + real.cumsum(-1) > state.keep_first)


def causal_process(
    state: Any, block: nn.Module, x: torch.Tensor, scores: torch.Tensor, real: torch.Tensor, seen: torch.Tensor
) -> torch.Tensor:
    """[B, q] bool: the tokens the block processes under the causal rule (``seen``: real tokens before them)."""
    if state.capacity >= 1.0:
        return real.clone()
    decided = decided_tokens(state, real, seen)
    if state.causal != "aux" and not state.threshold_started:
        threshold = state.router.threshold
        thresholds.start(threshold, thresholds.quantile_of(scores, decided, 1.0 - state.capacity))
        # read once, until a number holds: a started threshold only moves by number (training, fitting)
        state.threshold_started = not bool(threshold.isnan())
    process = real & decide(state, block, x, scores)
    if state.keep_first:
        process |= real & ~decided
    return process


def learn_from_topk(
    state: Any, block: nn.Module, x: torch.Tensor, scores: torch.Tensor, idx: torch.Tensor,
    padding: torch.Tensor | None,
) -> None:  # fmt: skip
    """In a top-k forward: the causal rule's loss and running threshold, on the tokens it decides."""
    learn = state.causal in ("aux", "predictor")
    # The predictor reads the router's margin over the threshold, so its threshold follows the router too.
    track = state.causal in ("threshold", "predictor") and block.training and torch.is_grad_enabled()
    if state.capacity >= 1.0 or not (learn or track):
        return
    member = keep_mask(idx, scores.shape[-1])
    real = ~padding if padding is not None else torch.ones_like(member)
    decided = decided_tokens(state, real)
    quantile = thresholds.quantile_of(scores, decided, 1.0 - state.capacity)
    if state.causal == "predictor":  # its logit reads the margin over the threshold, which must be a number
        thresholds.start(state.router.threshold, quantile)
    if learn:
        logits = decision_logits(state, block, x, scores)
        weight = decided.to(logits.dtype)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, member.to(logits.dtype), weight, reduction="sum")
        state.hooks.aux_losses.append(loss / weight.sum().clamp(min=1.0))
    if track:
        thresholds.follow(state.router.threshold, quantile)
