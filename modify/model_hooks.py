"""The model-level pieces of a converted model: its output hook and its ``generate()``.

- Before each forward: the causal rule's losses of the last forward are cleared, and the model's own padding
  (its 2-D ``attention_mask``) is handed to the routed blocks and no-op layers the probe saw no mask in
  (NemotronH's Mamba layers, MoE layers).
- After it: the causal rule's losses are returned the way Hugging Face MoE models return their router loss:
  ``outputs.loss`` = language-model loss + ``aux_loss_coef`` × ``outputs.aux_loss`` (the mean over routed
  blocks), the language-model loss alone in ``outputs.lm_loss``. So ``modify train`` and
  ``transformers.Trainer`` train them unchanged.
- ``generate()``: inside it the model's :class:`~modify.routing.state.Generation` is active, so mode "auto"
  routes causally; beam search is refused.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from modify.archs import attention_refusal
from modify.errors import UnsupportedModelError
from modify.moe.noop import find_moe, noop_layers
from modify.passes.find_block_stack import find_block_stack
from modify.routing.state import Generation, routed_blocks

__all__ = ["install_model_hooks", "remove_model_hooks", "aux_loss_coef", "generation_of"]

_HOOKS_ATTR = "_modify_causal_hooks"


def _every_moe_layer_staged(model: nn.Module, states: list[Any]) -> bool:
    """Every Mixture-of-Experts layer of the model sits in a block routed in front (staged)."""
    try:
        _, stack = find_block_stack(model)
    except ValueError:
        return False
    moe_blocks = {i for i, block in enumerate(stack) if find_moe(block) is not None}
    return bool(moe_blocks) and moe_blocks <= {s.index for s in states}


class _Hooks:
    """The model-level pieces of causal routing: the loss hooks and ``generate()`` in causal mode."""

    def __init__(self, model: nn.Module, coef: float) -> None:
        self.coef = coef
        self.states = [state for _, state in routed_blocks(model)]
        self.noops = [state for _, state in noop_layers(model)]
        # Blocks the probe saw no mask in (NemotronH's Mamba layers): padding from the model's own input.
        self.blind = [s.hooks for s in self.states if s.spec.pairwise is None and s.spec.padding_mask is None]
        self.blind += self.noops  # MoE layers get no mask either
        self.generation = Generation()
        for s in (*self.states, *self.noops):
            s.generation = self.generation
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
            s.hooks.aux_losses.clear()
        if self.blind:
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            padding = ~mask.bool() if torch.is_tensor(mask) and mask.dim() == 2 else None
            for target in self.blind:
                target.input_padding = padding

    def add_loss(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        losses = [loss for s in self.states for loss in s.hooks.aux_losses]
        for s in self.states:
            s.hooks.aux_losses.clear()
        for target in self.blind:
            target.input_padding = None
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
    hooks: _Hooks = getattr(self, _HOOKS_ATTR)
    config = kwargs.get("generation_config") or getattr(self, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1) or 1)
    if beams > 1 and any(s.enabled for s in hooks.states):
        # Beam search reorders the cache between steps; which positions each routed layer holds would not follow.
        raise ValueError(
            f"beam search (num_beams={beams}) is not supported on a converted model: causal routing keeps per-sequence "
            "state beside the cache that beam reordering would not follow; use greedy or sampling (num_beams=1)"
        )
    hooks.generation.active = True
    try:
        return type(self).generate(self, *args, **kwargs)
    finally:
        hooks.generation.active = False


def aux_loss_coef(model: nn.Module) -> float | None:
    """The coefficient the model's output hook adds its routers' auxiliary loss with (None: no hook)."""
    hooks = getattr(model, _HOOKS_ATTR, None)
    return None if hooks is None else hooks.coef


def generation_of(model: nn.Module) -> Generation | None:
    """The model's :class:`~modify.routing.state.Generation` (None: not converted)."""
    hooks = getattr(model, _HOOKS_ATTR, None)
    return None if hooks is None else hooks.generation


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
