"""Find the stack of repeated transformer blocks in a model's module tree.

A decoder-only transformer keeps its blocks in one ``nn.ModuleList`` of modules of the same class
(``model.layers`` in Llama, ``transformer.h`` in GPT-2). This step finds that list: first by the hint in
:data:`modify.archs.BLOCK_STACKS` for the model's ``config.model_type``, else by searching every module list
of at least two identical blocks and taking the one holding the most parameters. Whether each block is
residual is confirmed later from its graph (:mod:`modify.passes.analyze_residual`).

It only reads the model.
"""

from __future__ import annotations

from torch import nn

from modify.archs import BLOCK_STACKS
from modify.errors import UnsupportedModelError

__all__ = ["find_block_stack"]


def _is_block_list(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) < 2:
        return False
    first = type(module[0])
    return all(type(m) is first for m in module) and any(True for _ in module[0].parameters())


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return the qualified name and the module list of the model's transformer blocks.

    Raises:
        UnsupportedModelError: no list of at least two identical blocks with parameters exists.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    hint = BLOCK_STACKS.get(model_type or "")
    if hint is not None:
        # CausalLM heads wrap the base model; the hint is relative to either.
        for prefix in ("", *[name + "." for name, _ in model.named_children()]):
            try:
                candidate = model.get_submodule(prefix + hint if prefix else hint)
            except AttributeError:
                continue
            if _is_block_list(candidate):
                return (prefix + hint if prefix else hint), candidate  # type: ignore[return-value]
    lists = [(name, m) for name, m in model.named_modules() if _is_block_list(m)]
    if not lists:
        raise UnsupportedModelError(
            type(model).__name__,
            "no nn.ModuleList of two or more identical blocks was found; Mixture-of-Depths routes a stack of "
            "repeated residual blocks",
        )
    name, stack = max(lists, key=lambda item: _num_params(item[1]))
    return name, stack  # type: ignore[return-value]
