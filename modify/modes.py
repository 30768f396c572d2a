"""Model-wide switches of a converted model: the routing mode, and the causal rule's thresholds from text.

Which rule runs is the routing mode (:func:`set_routing`): "topk" (the training rule), "causal", or "auto"
(the default: causal inside ``generate()``, top-k elsewhere). ``modify.routing_disabled`` is the fourth,
"dense". Each routed block holds it as its one run-time switch (:mod:`modify.routing.state`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from modify.config import CONFIG_KEY
from modify.routing.state import routed_blocks

__all__ = ["ROUTING_MODES", "set_routing", "routing_mode", "fit_thresholds", "sync_plan", "run_topk"]

ROUTING_MODES = ("auto", "topk", "causal")


def _states(model: nn.Module) -> list[Any]:
    return [state for _, state in routed_blocks(model)]


def set_routing(model: nn.Module, mode: str) -> str:
    """Choose how routed blocks pick their tokens: "topk", "causal" or "auto"; returns the previous mode.

    "topk" is the training rule (the ceil(c·T) best tokens of each sequence); "causal" lets each token decide
    from its own score (the plan's causal rule), so the compute per token varies; "auto", the default, is
    causal inside ``generate()`` and top-k elsewhere.
    """
    if mode not in ROUTING_MODES:
        raise ValueError(f"unknown routing mode {mode!r}; choose one of {ROUTING_MODES}")
    states = _states(model)
    if not states:
        raise ValueError("the model has no routed blocks; convert it first (modify.convert)")
    previous = [state.switch(mode) for state in states]
    return previous[0]


@contextlib.contextmanager
def routing_mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """``set_routing`` inside the block, the previous mode after it."""
    previous = set_routing(model, mode)
    try:
        yield model
    finally:
        set_routing(model, previous)


def sync_plan(model: nn.Module) -> None:
    """Write the routed blocks' current thresholds into the plan in ``model.config`` (saved with the model)."""
    config = getattr(model, "config", None)
    plan = getattr(config, CONFIG_KEY, None) if config is not None else None
    if isinstance(plan, dict):
        states = sorted(_states(model), key=lambda s: s.index)
        plan["thresholds"] = [None if math.isnan(s.threshold) else s.threshold for s in states]


def _batches(batches: Iterable[Any]) -> Iterator[dict[str, Any]]:
    """Keyword dicts of a model's inputs, from token-id tensors [B, T] or keyword dicts."""
    for batch in batches:
        yield batch if isinstance(batch, dict) else {"input_ids": batch}


def run_topk(model: nn.Module, batches: Iterable[Any], handles: list[Any]) -> None:
    """Run ``model`` on ``batches`` with top-k routing in every routed block, then detach ``handles`` (the hooks
    that measure it) and put the blocks' modes back."""
    states = _states(model)
    previous = [s.switch("topk") for s in states]
    try:
        for batch in _batches(batches):
            model(**batch)
    finally:
        for s, mode in zip(states, previous):
            s.switch(mode)
        for handle in handles:
            handle.remove()


@torch.no_grad()
def fit_thresholds(model: nn.Module, batches: Iterable[Any]) -> list[float]:
    """Set each routed block's "threshold" rule from text: the (1 - c) quantile of its router scores.

    The model runs top-k routing over ``batches`` (token-id tensors [B, T], or keyword dicts); each block's
    scores of real tokens (a dict's ``attention_mask`` marks them; padding may be on either side), each row's
    always-processed leading ones left out, are pooled, so that on text like this the share of real tokens
    scoring above the threshold is the block's capacity. Returns the thresholds, in block order.
    """
    found = sorted(_states(model), key=lambda s: s.index)
    scores: dict[int, list[torch.Tensor]] = {s.index: [] for s in found}
    real: list[torch.Tensor | None] = [None]  # the batch being run's attention mask, as booleans

    def tracked() -> Iterator[dict[str, Any]]:
        for batch in _batches(batches):
            mask = batch.get("attention_mask")
            real[0] = mask.bool() if mask is not None else None
            yield batch

    def observer_for(state: Any) -> Any:
        def observe(s: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor) -> None:
            mask = real[0].to(s.device) if real[0] is not None else torch.ones_like(s, dtype=torch.bool)
            # The leading tokens are a row's first real ones, wherever its padding is (left-padded rows too).
            counted = mask & (mask.cumsum(-1) > state.keep_first)
            scores[state.index].append(s[counted].double().cpu())

        return observe

    run_topk(model, tracked(), [s.hooks.add_selection(observer_for(s)) for s in found])
    for s in found:
        pooled = torch.cat(scores[s.index]) if scores[s.index] else torch.empty(0, dtype=torch.float64)
        if s.capacity < 1.0 and pooled.numel() > 0:
            s.threshold = float(torch.quantile(pooled, 1.0 - s.capacity))
    sync_plan(model)
    return [s.threshold for s in found]
