"""Find the stack of repeated transformer blocks in a model's module tree.

A decoder-only transformer keeps its blocks in one ``nn.ModuleList`` (``model.layers`` in Llama,
``transformer.h`` in GPT-2), usually of one class, of several in hybrids (attention and state-space layers,
self- and cross-attention layers). This step finds that list: first by the hint in
:data:`modify.archs.BLOCK_STACKS` for the model's ``config.model_type``, else by searching every module list
of at least two blocks with parameters. Where several qualify (a multimodal model's vision or audio encoder
beside its language model), the ones whose blocks run in a forward on token ids alone are kept, and of those
the one holding the most parameters wins. Whether each block is residual is confirmed later from its graph
(:mod:`modify.passes.analyze_residual`).

It changes nothing; only a model with several candidate lists is run once (no gradients, eval mode).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from modify.archs import BLOCK_STACKS
from modify.errors import UnsupportedModelError
from modify.passes.probe_block_calls import random_token_ids, vocab_size

__all__ = ["find_block_stack"]


def _is_block_list(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) < 2:
        return False
    return all(not isinstance(m, (nn.ModuleList, nn.ModuleDict)) and any(True for _ in m.parameters()) for m in module)


_RUNS: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()


def _run_on_tokens(model: nn.Module, lists: list[tuple[str, nn.Module]]) -> dict[str, bool]:
    """Which of ``lists`` have a block that runs when the model is called on token ids alone (cached)."""
    known = _RUNS.get(model, {})
    if all(name in known for name, _ in lists):
        return known
    vocab = vocab_size(model)
    if not vocab:
        return {name: True for name, _ in lists}
    ran: set[str] = set()
    handles = [
        block.register_forward_pre_hook(lambda *_, name=name: ran.add(name))
        for name, blocks in lists
        for block in blocks
    ]
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=random_token_ids(model, 1, 8, torch.Generator().manual_seed(0)))
    except Exception:  # a model that needs more than token ids: keep every candidate
        ran = {name for name, _ in lists}
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    _RUNS[model] = {name: name in ran for name, _ in lists}
    return _RUNS[model]


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return the qualified name and the module list of the model's transformer blocks.

    Raises:
        UnsupportedModelError: no list of at least two blocks with parameters exists.
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
            "no nn.ModuleList of two or more blocks was found; Mixture-of-Depths routes a stack of "
            "repeated residual blocks",
        )
    if len(lists) > 1:
        ran = _run_on_tokens(model, lists)
        lists = [item for item in lists if ran[item[0]]] or lists
    name, stack = max(lists, key=lambda item: _num_params(item[1]))
    return name, stack  # type: ignore[return-value]
