"""Living beside accelerate: where a routed block's new modules go, and where its routed forward sits.

accelerate places a model over devices and offloads it (``device_map``, ``dispatch_model``, the offload
folder) by putting a hook on a module: its instance ``forward`` becomes a wrapper that moves the inputs to
the execution device, loads offloaded weights from a weights map, calls ``module._old_forward`` and offloads
them again. A routed forward put on the block's instance ``forward`` would throw that wrapper away (the
weights stay on the meta device), and removing it would delete accelerate's. So, as PEFT wraps rather than
patches, the routed forward takes the place of the call accelerate wraps (``_old_forward``) when the block
is hooked, and the block's own ``forward`` otherwise; a hook added after conversion wraps the routed forward
the same way (accelerate keeps whatever ``forward`` it finds as ``_old_forward``). Undoing puts back
exactly what was there.

Modules added to a block (router, skip path, predictor) live on the block's execution device; under an
offloading hook their tensors join its weights map and go to the meta device, as every offloaded weight does.
"""

from __future__ import annotations

import types
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modify.errors import UnsupportedModelError

__all__ = ["Wrapped", "wrap_forward", "unwrap_forward", "block_device", "register_offloaded", "keep_resident"]

_HOOK = "_hf_hook"
_INNER = "_old_forward"


@dataclass(frozen=True)
class Wrapped:
    """Where :func:`wrap_forward` put a forward, and what was there before."""

    attr: str
    previous: Any


def wrap_forward(block: nn.Module, fn: Callable[..., Any]) -> Wrapped:
    """Make ``fn`` (a method bound to ``block``) the block's forward, under any accelerate hook on it."""
    attr = _INNER if _HOOK in block.__dict__ and _INNER in block.__dict__ else "forward"
    previous = block.__dict__.get(attr)
    setattr(block, attr, fn)
    return Wrapped(attr, previous)


def unwrap_forward(block: nn.Module, func: Callable[..., Any], wrapped: Wrapped) -> None:
    """Undo :func:`wrap_forward` of a method of ``func``, wherever it now is: still the block's forward, or
    the call a hook added since wraps (then that hook keeps wrapping the block's original forward)."""
    for attr in ("forward", _INNER):
        found = block.__dict__.get(attr)
        if getattr(found, "__func__", None) is not func:
            continue
        previous = wrapped.previous if attr == wrapped.attr else None
        if previous is not None:
            setattr(block, attr, previous)
        elif attr == "forward":
            del block.forward
        else:
            setattr(block, attr, types.MethodType(type(block).forward, block))
        return


def _align_hooks(module: nn.Module) -> list[Any]:
    hook = module.__dict__.get(_HOOK)
    hooks = getattr(hook, "hooks", [hook])  # a SequentialHook holds several
    return [h for h in hooks if hasattr(h, "execution_device")]


def _covering_hooks(model: nn.Module, name: str) -> list[tuple[str, Any]]:
    """The accelerate device hooks on the module ``name`` and its ancestors, nearest first, with their owners."""
    parts = name.split(".") if name else []
    found = []
    for depth in range(len(parts), -1, -1):
        owner = ".".join(parts[:depth])
        found += [(owner, h) for h in _align_hooks(model.get_submodule(owner))]
    return found


def block_device(model: nn.Module, name: str) -> torch.device:
    """The device block ``name`` computes on: its (or an ancestor's) hook's execution device, else where its
    first real tensor lies, else where the model's does (a block with no tensors of its own)."""
    for _, hook in _covering_hooks(model, name):
        if hook.execution_device is not None:
            device = hook.execution_device
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    block = model.get_submodule(name)
    for module in (block, model):
        for t in (*module.parameters(), *module.buffers()):
            if not t.is_meta:
                return t.device
    return torch.device("cpu")


def register_offloaded(model: nn.Module, name: str) -> None:
    """Hand the tensors of the module ``name`` (just added, on the execution device) to the offloading hook
    that covers it, if one does: into its weights map, and to the meta device. Tensors the map already holds
    (routers loaded with an offloaded checkpoint) are left as they are."""
    covering = _covering_hooks(model, name)
    if not any(getattr(hook, "offload", False) and hook.weights_map is not None for _, hook in covering):
        return
    # optional dependency: accelerate, only for a model it offloads (import modify works on plain torch models)
    from accelerate.utils import set_module_tensor_to_device
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    for owner, hook in covering:
        if not getattr(hook, "offload", False) or hook.weights_map is None:
            continue
        store, prefix = hook.weights_map, ""
        while isinstance(store, PrefixedDataset):
            prefix, store = store.prefix + prefix, store.dataset
        target = store.state_dict if isinstance(store, OffloadedWeightsLoader) else store
        if not isinstance(target, MutableMapping):
            raise UnsupportedModelError(
                name,
                f"it is offloaded by a hook whose weights map ({type(store).__name__}) can't take new tensors; convert "
                "the model loaded without offload, save it, and load the converted model with offload",
            )
        module = model.get_submodule(name)
        relative = name[len(owner) + 1 :] if owner else name
        for tensor_name, tensor in module.named_parameters():
            key = f"{prefix}{relative}.{tensor_name}"
            # (by its keys: a Mapping's `in` would load an offloaded tensor from disk to answer)
            if key in target or key in getattr(store, "index", {}) or tensor.is_meta:
                continue
            target[key] = tensor.detach().cpu()
            if isinstance(store, OffloadedWeightsLoader):
                store.all_keys.append(key)
            set_module_tensor_to_device(module, tensor_name, "meta")
        return


def keep_resident(model: nn.Module, name: str) -> None:
    """Load the module ``name`` onto its execution device for good, if accelerate offloads it with a hook of
    its own (transformers' layout puts one on every module with weights). A router is read outside its
    forward (its gate's scale), where such a hook has put its weights back on the meta device; it is small.
    A hook on the block or above, which loads it for the whole block call, stays."""
    module = model.get_submodule(name)
    hooks = [h for h in _align_hooks(module) if getattr(h, "offload", False) and h.weights_map is not None]
    if not hooks:
        return
    # optional dependency: accelerate, only for a model it offloads (import modify works on plain torch models)
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    hook = hooks[0]
    for tensor_name, tensor in module.named_parameters():
        if tensor.is_meta:
            set_module_tensor_to_device(module, tensor_name, hook.execution_device, value=hook.weights_map[tensor_name])
    remove_hook_from_module(module)
