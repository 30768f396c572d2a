"""What learns in a run (``--train``), the optimizer's parameter groups, and LoRA with peft.

- ``full``: every weight; routers at ``--router-lr``.
- ``routers``: the routers alone (the model frozen).
- ``routers+norms``: the routers and every normalisation layer's weights.
- ``routers+skip``: the routers and the skip paths (:mod:`modify.routing.skip_path`).
- ``lora``: LoRA (peft) on every linear layer of the blocks, plus the routers and skip paths trained in full.
  Checkpoints and the final model hold the merged weights W + B·A, computed out of place so that the weights
  being trained are never rounded by a merge and unmerge; the adapters are saved beside them.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from modify.errors import ModifyError
from modify.moe.noop import NOOP_ATTR
from modify.passes.find_block_stack import find_block_stack
from modify.routing.router import PREDICTOR_ATTR, ROUTER_ATTR
from modify.routing.skip_path import SKIP_ATTR

__all__ = ["prepare_trainable", "param_groups", "merged_state_dict", "base_model", "LORA_ADAPTER"]

#: peft's name for the adapter this module adds.
LORA_ADAPTER = "default"


def _is_router(name: str) -> bool:
    """The router, the causal predictor that learns its decisions (trained with it, at its rate), or the
    no-op expert of an integrated Mixture-of-Experts layer."""
    return f"{ROUTER_ATTR}." in name or f"{PREDICTOR_ATTR}." in name or f"{NOOP_ATTR}." in name


def _is_skip_path(name: str) -> bool:
    return f"{SKIP_ATTR}." in name


def _norm_parameters(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def _block_linears(model: nn.Module) -> list[str]:
    stack_name, stack = find_block_stack(model)
    names = []
    for i, block in enumerate(stack):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and ROUTER_ATTR not in name and SKIP_ATTR not in name:
                names.append(f"{stack_name}.{i}.{name}")
    return names


def prepare_trainable(model: nn.Module, mode: str, rank: int = 16, alpha: float = 32.0) -> nn.Module:
    """Set ``requires_grad`` for ``mode``; for ``lora``, return the peft model wrapping ``model``."""
    if mode == "lora":
        targets = _block_linears(model)
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none")
        model = get_peft_model(model, config)
        for name, p in model.named_parameters():  # peft froze everything but the adapters
            if _is_router(name) or _is_skip_path(name):
                p.requires_grad_(True)
        return model
    norms = _norm_parameters(model)
    for name, p in model.named_parameters():
        if mode == "full":
            p.requires_grad_(True)
        elif mode == "routers":
            p.requires_grad_(_is_router(name))
        elif mode == "routers+skip":
            p.requires_grad_(_is_router(name) or _is_skip_path(name))
        else:  # routers+norms
            p.requires_grad_(_is_router(name) or id(p) in norms)
    if not any(p.requires_grad for p in model.parameters()):
        raise ModifyError(f"--train {mode} leaves nothing to train in this model; use --train full")
    return model


def param_groups(model: nn.Module, lr: float, router_lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Routers at ``router_lr`` without decay; weight matrices with decay; norms, biases and 1-D without."""
    groups: dict[str, list[nn.Parameter]] = {"router": [], "decay": [], "no_decay": []}
    names: dict[str, list[str]] = {"router": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "router" if _is_router(name) else ("decay" if p.dim() >= 2 else "no_decay")
        groups[key].append(p)
        names[key].append(name)
    settings = {"router": (router_lr, 0.0), "decay": (lr, weight_decay), "no_decay": (lr, 0.0)}
    return [
        {
            "params": groups[k],
            "lr": settings[k][0],
            "base_lr": settings[k][0],
            "weight_decay": settings[k][1],
            "name": k,
        }
        for k in ("router", "decay", "no_decay")
        if groups[k]
    ]


def base_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (of the trained model) under the base model's names, LoRA merged in: W + scale·B·A.

    A plain model's state is returned as it is.
    """
    if not hasattr(model, "peft_config"):
        return state
    prefix = "base_model.model."
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        merged[key.removeprefix(prefix).replace(".base_layer.", ".")] = value
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and LORA_ADAPTER in module.lora_A:
            key = f"{name.removeprefix(prefix)}.weight"
            with torch.no_grad():
                delta = module.get_delta_weight(LORA_ADAPTER).detach().to("cpu", merged[key].dtype)
            merged[key] = merged[key] + delta
    return merged
