"""Causal routing: how a token decides alone whether a routed block processes it, and what teaches it.

Top-k over a sequence is not causal: whether token t is among a block's top k depends on the tokens after it.
Sampling needs a rule each token can apply alone (Raposo et al. 2024, section 3.5); the plan's ``causal``
names one (see :data:`modify.config.CAUSAL_RULES`):

- ``threshold``: process when the router score exceeds the block's threshold, the (1 - c) quantile of the
  scores on calibration text (:func:`fit_thresholds`), so the expected share processed is the capacity c;
  training updates it from running statistics (an exponential average of each batch's quantile);
- ``aux``: process when the score is > 0, the router trained with a binary cross-entropy on its scores with
  top-k membership as targets;
- ``predictor``: process when a small MLP on the stop-gradient block input (:class:`modify.router.MoDPredictor`)
  gives a logit > 0, trained on the same targets; the language-model loss never reaches it. Its logit adds
  the MLP's correction (zero at first) to the threshold rule's margin, so it starts where that rule is.

The two losses are computed in the top-k (training) forward and returned the way Hugging Face MoE models
return their router loss: ``outputs.loss`` = language-model loss + ``aux_loss_coef`` × ``outputs.aux_loss``
(the mean over routed blocks), the language-model loss alone in ``outputs.lm_loss``. So ``modify train`` and
``transformers.Trainer`` train them unchanged.

Which rule runs is the routing mode (:func:`set_routing`): "topk" (the training rule), "causal", or "auto"
(the default: causal inside ``generate()``, top-k elsewhere).
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from modify.archs import attention_refusal
from modify.errors import UnsupportedModelError
from modify.router import PREDICTOR_ATTR

__all__ = [
    "ROUTING_MODES",
    "set_routing",
    "routing_mode",
    "fit_thresholds",
    "measure_agreement",
    "sync_plan",
    "install_model_hooks",
    "remove_model_hooks",
]

ROUTING_MODES = ("auto", "topk", "causal")
#: Weight of each training batch's score quantile in the running threshold of the "threshold" rule.
THRESHOLD_MOMENTUM = 0.05
_HOOKS_ATTR = "_modify_causal_hooks"


def noop_layers(model: nn.Module) -> list[Any]:
    from modify.api import noop_layers as layers

    return layers(model)


def _every_moe_layer_staged(model: nn.Module, states: list[Any]) -> bool:
    """Every Mixture-of-Experts layer of the model sits in a block routed in front (staged)."""
    from modify.moe.noop import find_moe
    from modify.passes.find_block_stack import find_block_stack

    try:
        _, stack = find_block_stack(model)
    except ValueError:
        return False
    moe_blocks = {i for i, block in enumerate(stack) if find_moe(block) is not None}
    return bool(moe_blocks) and moe_blocks <= {s.index for s in states}


def _states(model: nn.Module) -> list[Any]:
    from modify.api import routed_blocks

    return [state for _, state in routed_blocks(model)]


def decision_logits(state: Any, block: nn.Module, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """[B, T] what a token's decision compares with the threshold: the predictor's logit (which starts from the
    threshold rule's margin), else the router score."""
    if state.causal == "predictor":
        return getattr(block, PREDICTOR_ATTR)(x, scores - state.router.threshold)
    return scores


def decision_threshold(state: Any) -> torch.Tensor | float:
    return state.router.threshold if state.causal == "threshold" else 0.0


def causal_process(
    state: Any, block: nn.Module, x: torch.Tensor, scores: torch.Tensor, real: torch.Tensor, seen: torch.Tensor
) -> torch.Tensor:
    """[B, q] bool: the tokens the block processes under the causal rule (``seen``: real tokens before them)."""
    if state.capacity >= 1.0:
        return real.clone()
    decided = real & (seen[:, None] + real.cumsum(-1) > state.keep_first)  # the leading ones are processed
    if state.causal != "aux":
        start_threshold(state, capacity_quantile(state, scores, decided))
    process = real & (decision_logits(state, block, x, scores) > decision_threshold(state))
    if state.keep_first:
        process |= real & ~decided
    return process


def capacity_quantile(state: Any, scores: torch.Tensor, decided: torch.Tensor) -> torch.Tensor:
    """The (1 - c) quantile of the scores of the tokens a block decides (``decided``): about a capacity
    share of such tokens score above it. NaN when no token is decided."""
    return torch.nanquantile(scores.detach().float().masked_fill(~decided, float("nan")), 1.0 - state.capacity)


def start_threshold(state: Any, quantile: torch.Tensor) -> None:
    """Set a block's unfitted (NaN) threshold to ``quantile`` (:func:`capacity_quantile` of the first text it
    decides on: a fresh conversion's prompt in ``generate()``, or a training batch); fitting on calibration
    text (:func:`fit_thresholds`) or training replaces it. Tensor operations only, no flag: no host sync, and
    a compiled model doesn't recompile once the threshold is set."""
    threshold = state.router.threshold
    threshold.copy_(torch.where(threshold.isnan(), quantile, threshold))


def observe_topk(
    state: Any, block: nn.Module, x: torch.Tensor, scores: torch.Tensor, idx: torch.Tensor,
    padding: torch.Tensor | None,
) -> None:  # fmt: skip
    """In a top-k forward: the causal rule's loss, running threshold and agreement, on the tokens it decides."""
    learn = state.causal in ("aux", "predictor")
    # The predictor reads the router's margin over the threshold, so its threshold follows the router too.
    track = state.causal in ("threshold", "predictor") and block.training and torch.is_grad_enabled()
    if state.capacity >= 1.0 or not (learn or track or state.agreement is not None):
        return
    member = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
    real = ~padding if padding is not None else torch.ones_like(member)
    decided = real & (real.cumsum(-1) > state.keep_first)  # the leading tokens are always processed
    quantile = capacity_quantile(state, scores, decided) if track or state.causal == "predictor" else None
    if state.causal == "predictor":  # its logit reads the margin over the threshold, which must be a number
        start_threshold(state, quantile)
    # Masks and sums rather than boolean indexing and host syncs: static shapes, so torch.compile keeps the
    # model one graph.
    logits = decision_logits(state, block, x, scores) if learn or state.agreement is not None else scores
    if learn:
        weight = decided.to(logits.dtype)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, member.to(logits.dtype), weight, reduction="sum")
        state.aux_losses.append(loss / weight.sum().clamp(min=1.0))
    if track:
        threshold = state.router.threshold
        # An unfitted threshold (NaN) starts at the first batch's quantile; no token decided: no quantile.
        moved = torch.where(threshold.isnan(), quantile, threshold + THRESHOLD_MOMENTUM * (quantile - threshold))
        threshold.copy_(torch.where(quantile.isnan(), threshold, moved))
    if state.agreement is not None:
        decide = logits.detach() > decision_threshold(state)
        stats = [(decide == member) & decided, decide & decided, member & decided, decided]
        state.agreement += torch.stack([s.sum() for s in stats]).double().cpu()


# -- switching, plan, hooks ---------------------------------------------------------------------------------
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
    previous = states[0].mode
    for state in states:
        state.mode = mode
    return previous


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
    from modify.config import CONFIG_KEY

    config = getattr(model, "config", None)
    plan = getattr(config, CONFIG_KEY, None) if config is not None else None
    if isinstance(plan, dict):
        states = sorted(_states(model), key=lambda s: s.index)
        plan["thresholds"] = [None if math.isnan(s.threshold) else s.threshold for s in states]


def _batches(batches: Iterable[Any]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        yield batch if isinstance(batch, dict) else {"input_ids": batch}


@torch.no_grad()
def fit_thresholds(model: nn.Module, batches: Iterable[Any]) -> list[float]:
    """Set each routed block's "threshold" rule from text: the (1 - c) quantile of its router scores.

    The model runs top-k routing over ``batches`` (token-id tensors [B, T], or keyword dicts); each block's
    scores, the always-processed leading tokens left out, are pooled, so that on text like this the share of
    tokens scoring above the threshold is the block's capacity. Returns the thresholds, in block order.
    """
    found = sorted(_states(model), key=lambda s: s.index)
    scores: dict[int, list[torch.Tensor]] = {s.index: [] for s in found}
    previous = [(s.observer, s.mode) for s in found]

    def observer_for(state: Any) -> Any:
        def observe(s: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor) -> None:
            scores[state.index].append(s[:, state.keep_first :].flatten().double().cpu())

        return observe

    for s in found:
        s.observer, s.mode = observer_for(s), "topk"
    try:
        for batch in _batches(batches):
            model(**batch)
    finally:
        for s, (observer, mode) in zip(found, previous):
            s.observer, s.mode = observer, mode
    for s in found:
        if s.capacity < 1.0 and scores[s.index]:
            s.threshold = float(torch.quantile(torch.cat(scores[s.index]), 1.0 - s.capacity))
    sync_plan(model)
    return [s.threshold for s in found]


@torch.no_grad()
def measure_agreement(model: nn.Module, batches: Iterable[Any]) -> dict[int, dict[str, float]]:
    """Per routed block: how often the causal decision equals top-k membership on ``batches``.

    The model runs top-k routing (the computation it was trained with); each token a block decides (not
    padding, not an always-processed leading token) counts once. Returns, per block index, ``agreement``
    (share of equal decisions), ``causal_share`` (share the causal rule processes) and ``topk_share``.
    """
    found = _states(model)
    previous = [s.mode for s in found]
    for s in found:
        s.agreement, s.mode = torch.zeros(4, dtype=torch.float64), "topk"
    try:
        for batch in _batches(batches):
            model(**batch)
        result = {}
        for s in found:
            agree, causal, member, total = s.agreement.tolist()
            if total:
                result[s.index] = {
                    "agreement": agree / total,
                    "causal_share": causal / total,
                    "topk_share": member / total,
                }
        return result
    finally:
        for s, mode in zip(found, previous):
            s.agreement, s.mode = None, mode


class _Hooks:
    """The model-level pieces of causal routing: the loss hooks and ``generate()`` in causal mode."""

    def __init__(self, model: nn.Module, coef: float) -> None:
        self.coef = coef
        self.states = _states(model)
        # Blocks the probe saw no mask in (NemotronH's Mamba layers): padding from the model's own input.
        self.blind = [s for s in self.states if s.spec.pairwise is None and s.spec.padding_mask is None]
        self.noops = [state for _, state in noop_layers(model)]
        self.blind += self.noops  # MoE layers get no mask either
        self.every_moe_staged = _every_moe_layer_staged(model, self.states)
        self.handles = [
            model.register_forward_pre_hook(self.clear, with_kwargs=True),
            model.register_forward_hook(self.add_loss, with_kwargs=True),
        ]

    def clear(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        refusal = attention_refusal(getattr(module, "config", None))
        if refusal:  # switched after conversion (set_attn_implementation, generate_batch's paged attention)
            raise UnsupportedModelError("", refusal)
        recording = kwargs.get(
            "output_router_logits", getattr(getattr(module, "config", None), "output_router_logits", False)
        )
        if recording and self.every_moe_staged and all(s.enabled for s in self.states):
            raise ValueError(
                "every Mixture-of-Experts layer is in a routed block, whose router logits the load-balancing loss "
                "leaves out, so it has no layer to balance: pass output_router_logits=False, leave some MoE blocks "
                "unrouted, or convert with mode='integrated'"
            )
        for s in self.states:
            s.aux_losses.clear()
        if self.blind:
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            padding = ~mask.bool() if torch.is_tensor(mask) and mask.dim() == 2 else None
            for s in self.blind:
                s.input_padding = padding

    def add_loss(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        losses = [loss for s in self.states for loss in s.aux_losses]
        for s in self.states:
            s.aux_losses.clear()
        for s in self.blind:
            s.input_padding = None
        if not losses or not hasattr(output, "loss"):
            return output
        aux = torch.stack([loss.float() for loss in losses]).mean()
        lm = output.loss
        output.aux_loss = aux
        output.lm_loss = lm
        if lm is not None:
            output.loss = lm + self.coef * aux.to(lm.dtype)
        return output


def _generate(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    states = getattr(self, _HOOKS_ATTR).states
    config = kwargs.get("generation_config") or getattr(self, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1) or 1)
    if beams > 1 and any(s.enabled for s in states):
        # Beam search reorders the cache between steps; which positions each routed layer holds would not follow.
        raise ValueError(
            f"beam search (num_beams={beams}) is not supported on a converted model: causal routing keeps per-sequence "
            "state beside the cache that beam reordering would not follow; use greedy or sampling (num_beams=1)"
        )
    everyone = [*states, *getattr(self, _HOOKS_ATTR).noops]
    for s in everyone:
        s.generating = True
    try:
        return type(self).generate(self, *args, **kwargs)
    finally:
        for s in everyone:
            s.generating = False


def aux_loss_coef(model: nn.Module) -> float | None:
    """The coefficient the model's output hook adds its routers' auxiliary loss with (None: no hook)."""
    hooks = getattr(model, _HOOKS_ATTR, None)
    return None if hooks is None else hooks.coef


def install_model_hooks(model: nn.Module, coef: float) -> None:
    """Add the causal-routing loss to the model's outputs and make its ``generate()`` route causally."""
    remove_model_hooks(model)
    setattr(model, _HOOKS_ATTR, _Hooks(model, coef))
    if callable(getattr(type(model), "generate", None)):
        model.generate = types.MethodType(_generate, model)  # type: ignore[method-assign]


def remove_model_hooks(model: nn.Module) -> None:
    hooks = model.__dict__.pop(_HOOKS_ATTR, None)
    if hooks is not None:
        for handle in hooks.handles:
            handle.remove()
    if "generate" in model.__dict__:
        del model.generate
