"""Static removal as a plain checkpoint: delete blocks from the stack, so the model loads without modify.

A converted model whose routed blocks are all at capacity 0 (removed: no token runs them) computes what the
same model with those blocks deleted computes, bit for bit. :func:`remove_blocks` deletes them from a plain
model: the block stack loses them, every remaining attention's ``layer_idx`` (its layer in a Hugging Face
cache) is renumbered to its new position, and the config's ``num_hidden_layers`` and per-layer lists
(``layer_types``: any list of the text config with one entry per layer) follow. :func:`export_pruned` does
that to a converted model with a removal-only plan, after reverting it, so the result has no routers and no
plan: ``save_pretrained`` writes an ordinary checkpoint that ``AutoModelForCausalLM.from_pretrained`` and
other inference engines load as the architecture it is (ShortGPT's static baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from modify.api import is_converted, noop_layers, revert, routed_blocks
from modify.config import MoDConfig
from modify.errors import NotRemovalOnlyError, UnsupportedModelError
from modify.passes.find_block_stack import find_block_stack
from modify.routing.router import ROUTER_ATTR

__all__ = ["remove_blocks", "export_pruned", "removal_only_blocks", "check_removal_plan"]


def _listed(blocks: Sequence[int]) -> str:
    return ", ".join(str(i) for i in blocks)


def removal_only_blocks(model: nn.Module) -> list[int]:
    """The blocks a converted model removes (capacity 0), after checking that it does nothing else.

    Raises:
        NotRemovalOnlyError: a block is routed at a capacity in (0, 1) (or by a no-op expert), a removed block
            has a skip path, or a block at capacity 1.0 has a gate that moved from 1: a plain checkpoint with
            fewer layers can't compute any of these.
    """
    states = sorted((state for _, state in routed_blocks(model)), key=lambda s: s.index)
    # A no-op expert sends part of the tokens past the experts: routing, whatever its capacity.
    noops = [s.index for _, s in noop_layers(model)]
    _check_plan([s.index for s in states], [s.capacity for s in states], [s.skip_path for s in states], noops)
    blocks = {b_state.index: block for block, b_state in routed_blocks(model)}
    gated = [
        s.index for s in states if s.capacity == 1.0 and bool((getattr(blocks[s.index], ROUTER_ATTR).scale != 0).any())
    ]
    if gated:
        raise NotRemovalOnlyError(
            gated,
            f"blocks {_listed(gated)} run every token with a trained gate (scale != 0), so they are not the plain "
            "blocks; keep the converted checkpoint, or export a plan whose other blocks are not routed",
        )
    return [s.index for s in states if s.capacity == 0.0]


def _check_plan(
    routed: Sequence[int], capacities: Sequence[float], skip_paths: Sequence[str], routing: Sequence[int] = ()
) -> None:
    """Refuse blocks routed at a capacity in (0, 1) (and ``routing``: blocks that route otherwise), then removed
    blocks with a skip path. A skip path at capacity 1.0 never runs (no token is skipped): that block is plain."""
    partial = sorted({i for i, c in zip(routed, capacities) if 0.0 < c < 1.0} | set(routing))
    if partial:
        raise NotRemovalOnlyError(
            partial,
            f"blocks {_listed(partial)} are routed at capacities in (0, 1), which a checkpoint with fewer layers "
            "can't run; export a removal-only plan (modify calibrate --removal only) or keep the converted "
            "checkpoint",
        )
    with_path = sorted(i for i, c, p in zip(routed, capacities, skip_paths) if c == 0.0 and p != "identity")
    if with_path:
        raise NotRemovalOnlyError(
            with_path,
            f"removed blocks {_listed(with_path)} have skip paths, which a plain checkpoint has no module for; "
            "calibrate with --skip-path identity (or --removal only) to export",
        )


def check_removal_plan(plan: MoDConfig) -> list[int]:
    """The blocks a plan removes, after checking from the plan alone (before any weights load) that it does
    nothing else; :func:`removal_only_blocks` checks the loaded model's gates too.

    Raises:
        NotRemovalOnlyError: the plan routes a block at a capacity in (0, 1), or gives a removed block a skip path.
    """
    _check_plan(plan.routed, plan.capacities, plan.skip_paths, plan.routed if plan.mode == "integrated" else ())
    return plan.removed


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def remove_blocks(model: nn.Module, indices: Sequence[int]) -> nn.Module:
    """Delete blocks ``indices`` from a plain (not converted) model's block stack, in place; returns the model.

    The remaining blocks' attention ``layer_idx`` are renumbered to their new positions and the config's
    ``num_hidden_layers`` and per-layer lists (``layer_types``, ...) follow, so the model saves as an ordinary
    checkpoint of its architecture with fewer layers.

    Raises:
        ValueError: the model is converted (use :func:`export_pruned`), an index is out of range, or every
            block would go.
        UnsupportedModelError: a block's ``layer_idx`` is not its position in the stack (a layout whose cache
            layers this function can't renumber).
    """
    if is_converted(model):
        raise ValueError("the model is converted; use modify.export_pruned(model), or modify.revert(model) first")
    stack_name, stack = find_block_stack(model)
    count = len(stack)
    removed = sorted(set(int(i) for i in indices))
    for i in removed:
        if not 0 <= i < count:
            raise ValueError(f"block index {i} is out of range: valid indices are 0..{count - 1}")
    if len(removed) == count:
        raise ValueError(f"removing all {count} blocks leaves no model; keep at least one")
    kept = [i for i in range(count) if i not in set(removed)]
    for old in kept:
        for name, module in stack[old].named_modules():
            value = getattr(module, "layer_idx", None)
            if isinstance(value, int) and not isinstance(value, bool) and value != old:
                raise UnsupportedModelError(
                    f"{stack_name}.{old}.{name}".rstrip("."),
                    f"its layer_idx {value} is not its block's position {old}, so its cache layer can't be "
                    "renumbered; route the blocks at capacity 0 instead of deleting them",
                )
    for new, old in enumerate(kept):
        for module in stack[old].modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    parent_name, _, attr = stack_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.ModuleList(stack[i] for i in kept))
    config = getattr(model, "config", None)
    if config is not None:
        text = _text_config(config)
        for key, value in list(vars(text).items()):
            # One entry per layer (layer_types, and the like): keep the entries of the blocks that stay.
            if isinstance(value, (list, tuple)) and len(value) == count and key != "architectures":
                setattr(text, key, type(value)(value[i] for i in kept))
        if getattr(text, "num_hidden_layers", None) == count:
            text.num_hidden_layers = len(kept)
    return model


def export_pruned(model: nn.Module) -> nn.Module:
    """A converted model whose plan only removes blocks, as a plain model without them, in place.

    The routing is reverted (routers, plan and loading marker go), then the removed blocks are deleted
    (:func:`remove_blocks`); the result computes exactly what the converted model computed.

    Raises:
        NotRemovalOnlyError: the plan does more than remove blocks (see :func:`removal_only_blocks`).
        ValueError: the model is not converted.
    """
    if not is_converted(model):
        raise ValueError("the model is not converted; use modify.remove_blocks(model, indices) on a plain model")
    removed = removal_only_blocks(model)
    revert(model)
    return remove_blocks(model, removed) if removed else model
