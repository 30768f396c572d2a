"""Static removal as a plain checkpoint: delete blocks from the stack, so the model loads without modify.

A converted model whose routed blocks are all at capacity 0 (removed: no token runs them) computes what the
same model with those blocks deleted computes, bit for bit. :func:`remove_blocks` deletes them from a plain
model: the block stack loses them, every remaining attention's ``layer_idx`` (its layer in a Hugging Face
cache) is renumbered to its new position, and the config's ``num_hidden_layers``, per-layer lists
(``layer_types``: any list of the text config with one entry per layer) and the fields from which a family
decides a layer's kind by its index (:data:`modify.archs.LAYER_INDEX_FIELDS`: Qwen-MoE's sparse step, DeepSeek's
first dense layers, Jamba's attention period, Llama 4's MoE layers) follow. The model is then rebuilt from the
new config on the meta device and each kept block compared with the layer built in its place, so a layout the
config can't describe (a kind computed from the index or the depth) is refused before anything changes, not
saved to reload with random layers. :func:`export_pruned` does
that to a converted model with a removal-only plan, after reverting it, so the result has no routers and no
plan: ``save_pretrained`` writes an ordinary checkpoint that ``AutoModelForCausalLM.from_pretrained`` and
other inference engines load as the architecture it is (ShortGPT's static baseline).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modify.api import is_converted, noop_layers, revert, routed_blocks
from modify.archs import LAYER_INDEX_FIELDS
from modify.config import MoDConfig
from modify.errors import NotExportableError, NotRemovalOnlyError, UnsupportedModelError
from modify.moe.noop import NOOP_ATTR
from modify.passes.find_block_stack import find_block_stack
from modify.routing.router import PREDICTOR_ATTR, ROUTER_ATTR
from modify.routing.skip_path import SKIP_ATTR

__all__ = ["remove_blocks", "export_pruned", "removal_only_blocks", "check_removal_plan"]


_NO_BLOCK_LEFT = (
    "removing all {count} blocks leaves no model; keep at least one (calibrate with a larger --flops-budget, or "
    "give fewer blocks capacity 0)"
)


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
        NotExportableError: the plan removes every block.
    """
    _check_plan(plan.routed, plan.capacities, plan.skip_paths, plan.routed if plan.mode == "integrated" else ())
    if len(plan.removed) == plan.num_blocks:
        raise NotExportableError(_NO_BLOCK_LEFT.format(count=plan.num_blocks))
    return plan.removed


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _periodic(kinds: list[bool]) -> tuple[int, int] | None:
    """The smallest (period, offset), offset < period, with ``i % period == offset`` exactly where ``kinds``."""
    for period in range(1, len(kinds) + 2):
        for offset in range(period):
            if [i % period == offset for i in range(len(kinds))] == kinds:
                return period, offset
    return None


def _per_layer_settings(value: Any) -> bool:
    """A dict of layer index -> that layer's own settings (a dict), not ``id2label`` (index -> a name)."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(str(k).isdigit() and isinstance(v, dict) for k, v in value.items())
    )


def _renumbered(text: Any, kept: list[int], count: int) -> dict[str, Any]:
    """The text config's fields that change when only the blocks ``kept`` (of ``count``) stay, by
    :data:`modify.archs.LAYER_INDEX_FIELDS` and the one-entry-per-layer lists; the depth included."""
    fields = dict(vars(text))
    new = {old: i for i, old in enumerate(kept)}
    edits: dict[str, Any] = {}
    for key, value in fields.items():
        rule, partner = LAYER_INDEX_FIELDS.get(key, ("", ""))
        if rule == "indices" and isinstance(value, (list, tuple)):
            edits[key] = type(value)(new[i] for i in value if i in new)
        elif rule in ("below", "through") and isinstance(value, int) and not isinstance(value, bool):
            edits[key] = sum(i < value for i in kept) if rule == "below" else sum(i <= value for i in kept) - 1
        elif not rule and isinstance(value, (list, tuple)) and len(value) == count and key != "architectures":
            edits[key] = type(value)(value[i] for i in kept)  # one entry per layer (layer_types, and the like)
        elif not rule and _per_layer_settings(value):
            edits[key] = {str(new[int(k)]): v for k, v in value.items() if int(k) in new}
    for key, value in fields.items():  # the rules that read a partner field, after the partner's own edit
        rule, partner = LAYER_INDEX_FIELDS.get(key, ("", ""))
        if rule == "sparse step" and isinstance(value, int) and value > 0 and partner in fields:
            dense = set(fields[partner] or ())
            edits[partner] = [i for i, old in enumerate(kept) if (old + 1) % value != 0 or old in dense]
            edits[key] = 1
        elif rule == "period" and isinstance(value, int) and isinstance(fields.get(partner), int):
            found = _periodic([old % value == fields[partner] for old in kept])
            if found is not None:  # else the layers rebuilt from the config differ, and the check refuses
                edits[key], edits[partner] = found
        elif rule == "runs" and isinstance(edits.get(partner), list):
            edits[key] = [[[kind], 1] for kind in edits[partner]]
    if getattr(text, "num_hidden_layers", None) == count:
        edits["num_hidden_layers"] = len(kept)
    return edits


#: Module attributes that say how a module runs now, not what it is.
_RUNTIME_ATTRIBUTES = frozenset({"training", "gradient_checkpointing"})
_SCALARS = (bool, int, float, str, type(None))
_NOT_SCALAR = object()
_ROUTING_MODULES = frozenset({ROUTER_ATTR, SKIP_ATTR, PREDICTOR_ATTR, NOOP_ATTR})


def _scalar(value: Any) -> Any:
    """``value`` as the layout compares it (a list of scalars as a tuple, a float by its repr: NaN equals NaN),
    or _NOT_SCALAR (modules, tensors, configs: compared otherwise or not at all)."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, _SCALARS) for v in value):
        return tuple(repr(v) if isinstance(v, float) else v for v in value)
    if isinstance(value, _SCALARS):
        return repr(value) if isinstance(value, float) else value
    return _NOT_SCALAR


def _layout(root: nn.Module, skip: str = "") -> dict[tuple[str, str], Any]:
    """What ``root`` is, as its config builds it: each module's class, plain attributes and tensor shapes; the
    modules under ``skip`` (the block stack, compared block by block) left out."""
    out: dict[tuple[str, str], Any] = {}
    for name, module in root.named_modules():
        if skip and (name == skip or name.startswith(f"{skip}.")):
            continue
        if any(part in _ROUTING_MODULES for part in name.split(".")):
            continue  # a converted model's routers are not the architecture's (export_pruned checks before revert)
        out[(name, "class")] = type(module).__name__
        for key, value in vars(module).items():
            if key.startswith("_") or key in _RUNTIME_ATTRIBUTES:
                continue
            value = _scalar(value)
            if value is not _NOT_SCALAR:
                out[(name, key)] = value
        for key, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                out[(name, f"{key} shape")] = tuple(tensor.shape)
    return out


def _renumbers(mine: Any, rebuilt: Any, old: int, new: int, kept: list[int], count: int) -> bool:
    """Whether an attribute differs only as the block's position does: an index (``layer_number`` = index + 1),
    or a copy of a per-layer config list (GPT-Neo's attention keeps ``attention_layers``)."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (mine, rebuilt)):
        return mine - old == rebuilt - new
    if isinstance(mine, tuple) and isinstance(rebuilt, tuple) and len(mine) == count:
        return tuple(mine[k] for k in kept) == rebuilt
    return False


def _check_layout(model: nn.Module, stack_name: str, stack: nn.ModuleList, kept: list[int], edits: dict[str, Any],
                  removed: list[int]) -> list[tuple[nn.Module, str, Any]]:  # fmt: skip
    """Rebuild the model from its config with ``edits`` (on the meta device: no weights) and compare each kept
    block with the layer built in its new place, and the rest of the model with the rest, so that a saved
    checkpoint reloads as the model in memory.

    Returns (module, attribute, value) to set: the attributes that follow the block's position (``layer_number``
    = index + 1, a copy of a per-layer list), as ``layer_idx`` does, and outside the stack those named after a
    renumbered field (Mllama's ``cross_attention_layers``, the layer types a rotary embedding makes tables for)
    or equal to the depth. What the model keeps outside the stack for layers that went stays, unused.

    Raises:
        NotExportableError: the new config builds no model, or builds a kept layer (or the rest) otherwise.
    """
    name = type(model).__name__
    fix = "route these blocks at capacity 0 instead (a converted checkpoint keeps every layer)"
    config = copy.deepcopy(model.config)
    text = _text_config(config)
    for key, value in edits.items():
        setattr(text, key, value)
    try:
        with torch.device("meta"):
            rebuilt = type(model)(config)
    except Exception as exc:  # noqa: BLE001 - any family's constructor, refusing its config in its own way
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise NotExportableError(
            f"{name}'s config without blocks {_listed(removed)} builds no model ({type(exc).__name__}: {first}); {fix}"
        ) from None
    layers = rebuilt.get_submodule(stack_name)
    pairs = [(stack[old], layers[i], "", old, i) for i, old in enumerate(kept)] + [(model, rebuilt, stack_name, -1, -1)]
    settings: list[tuple[nn.Module, str, Any]] = []
    for mine_root, their_root, skip, old, new in pairs:
        mine, theirs = _layout(mine_root, skip), _layout(their_root, skip)
        for key in sorted(set(mine) | set(theirs), key=str):
            a, b = mine.get(key, "absent"), theirs.get(key, "absent")
            if a == b:
                continue
            if old < 0 and b == "absent":
                continue  # what the model keeps for layers that went (a rotary table of a type none of them has)
            attribute = "absent" not in (a, b) and key[1] != "class" and not key[1].endswith(" shape")
            if old < 0:  # outside the stack: a renumbered field's copy, or the depth (CTRL's num_layers)
                follows = key[1] in edits or (a == len(stack) and b == len(kept))
            else:
                follows = _renumbers(a, b, old, new, kept, len(stack))
            if attribute and follows:
                value = copy.copy(getattr(their_root.get_submodule(key[0]), key[1]))
                settings.append((mine_root.get_submodule(key[0]), key[1], value))
                continue
            where = ".".join(p for p in (stack_name, str(old), key[0]) if p) if old >= 0 else key[0] or "the model"
            raise NotExportableError(
                f"without blocks {_listed(removed)}, {name}'s config would rebuild {where} with {key[1]} {b!r} "
                f"instead of {a!r}: the family decides it from the layer's index or the depth, which a checkpoint "
                f"with fewer layers can't renumber; {fix}"
            )
    return settings


@dataclass
class _Removal:
    """A checked deletion, not yet made: the stack, the blocks that stay, the config's new fields, and the
    attributes to set (see :func:`_check_layout`)."""

    stack_name: str
    stack: nn.ModuleList
    kept: list[int]
    edits: dict[str, Any]
    settings: list[tuple[nn.Module, str, Any]]


def _prepare(model: nn.Module, indices: Sequence[int]) -> _Removal:
    """Check deleting blocks ``indices`` (every refusal of :func:`remove_blocks`) without changing the model."""
    stack_name, stack = find_block_stack(model)
    count = len(stack)
    removed = sorted(set(int(i) for i in indices))
    for i in removed:
        if not 0 <= i < count:
            raise ValueError(f"block index {i} is out of range: valid indices are 0..{count - 1}")
    if len(removed) == count:
        raise NotExportableError(_NO_BLOCK_LEFT.format(count=count))
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
    config = getattr(model, "config", None)
    edits = _renumbered(_text_config(config), kept, count) if config is not None else {}
    settings = []
    if config is not None and hasattr(type(model), "config_class"):  # a transformers model: it will be reloaded
        settings = _check_layout(model, stack_name, stack, kept, edits, removed)
    return _Removal(stack_name, stack, kept, edits, settings)


def _apply(model: nn.Module, removal: _Removal) -> nn.Module:
    for new, old in enumerate(removal.kept):
        for module in removal.stack[old].modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    for module, attr, value in removal.settings:
        setattr(module, attr, value)
    parent_name, _, attr = removal.stack_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.ModuleList(removal.stack[i] for i in removal.kept))
    config = getattr(model, "config", None)
    if config is not None:
        text = _text_config(config)
        for key, value in removal.edits.items():
            setattr(text, key, value)
    return model


def remove_blocks(model: nn.Module, indices: Sequence[int]) -> nn.Module:
    """Delete blocks ``indices`` from a plain (not converted) model's block stack, in place; returns the model.

    The remaining blocks' attention ``layer_idx`` are renumbered to their new positions, the config's
    ``num_hidden_layers``, per-layer lists (``layer_types``, ...) and index-dependent fields
    (:data:`modify.archs.LAYER_INDEX_FIELDS`) follow, and the layers the new config builds are checked against
    the kept blocks, so the model saves as an ordinary checkpoint of its architecture with fewer layers that
    reloads as it is in memory.

    Raises:
        ValueError: the model is converted (use :func:`export_pruned`) or an index is out of range.
        NotExportableError: every block would go, or the config can't describe the kept layers (a layer's kind
            decided from its index or the depth in a way no field renumbers); the model is left as it was.
        UnsupportedModelError: a block's ``layer_idx`` is not its position in the stack (a layout whose cache
            layers this function can't renumber).
    """
    if is_converted(model):
        raise ValueError("the model is converted; use modify.export_pruned(model), or modify.revert(model) first")
    return _apply(model, _prepare(model, indices))


def export_pruned(model: nn.Module) -> nn.Module:
    """A converted model whose plan only removes blocks, as a plain model without them, in place.

    The deletion is checked (:func:`remove_blocks`' refusals), then the routing is reverted (routers, plan and
    loading marker go) and the removed blocks are deleted; the result computes exactly what the converted model
    computed. A refusal leaves the converted model as it was.

    Raises:
        NotRemovalOnlyError: the plan does more than remove blocks (see :func:`removal_only_blocks`).
        NotExportableError: see :func:`remove_blocks`.
        ValueError: the model is not converted.
    """
    if not is_converted(model):
        raise ValueError("the model is not converted; use modify.remove_blocks(model, indices) on a plain model")
    removed = removal_only_blocks(model)
    removal = _prepare(model, removed) if removed else None
    revert(model)
    return _apply(model, removal) if removal is not None else model
