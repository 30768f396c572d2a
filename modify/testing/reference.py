"""An independent reference for a routed block at capacity < 1, built from the family's own model code.

For each block in turn, only that block is converted (capacity 0.5, a random router whose gates differ from
1), so its input is the dense model's. Its output is compared with a reference that shares none of modify's
gathering code:

1. the k highest router scores of each row, in positional order (``torch.topk``, sorted);
2. the original model called on the selected subsequence only: ``inputs_embeds`` of length k,
   ``position_ids`` the selected original positions and an all-ones attention mask (without one,
   transformers reads every jump in position ids as a new packed document). A hook takes the arguments the
   model itself computes for the block (masks, rotary tables, biases) and stops the call there;
3. the original block on the selected hidden states with those arguments, Δ scattered back with the gate.

Where a family computes positions from something other than ``position_ids``, the reference must still
give each token its original position. :data:`POSITION_RULES` holds that knowledge, one entry per family; a
family whose model renumbers the position ids it was given (from the attention mask, say) is seen by the ids
its block receives, and gets the full sequence's position ids and rotary tables at the selected tokens.
A sliding window is cut to :data:`WINDOW` positions, so that it bites within the check's tokens; the model
would build the subsequence's window over its k indices, so the reference takes the full sequence's masks at
the selected queries and keys. The reference is checked too: at capacity 1.0 (every token selected) it must
equal the dense block's output, or the family is unverified.
A family the reference can't be built for is "unverified at c < 1", not supported.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

import modify
from modify.api import routed_blocks

__all__ = [
    "POSITION_RULES",
    "UnverifiedError",
    "reference_error",
    "check_reference",
    "kv_all_reference_error",
    "check_kv_all_reference",
    "TOLERANCE",
]

#: Largest |routed - reference| / max |x| that passes (float32; the two add Δ's parts in different orders).
TOLERANCE = 1e-5
_CAPACITY, _BATCH, _LENGTH, _GATE_SCALE = 0.5, 2, 16, 0.7


class UnverifiedError(Exception):
    """The reference can't be built for this family; the message says why."""


class _Stop(Exception):
    pass


def _alibi_keys_at_positions(name: str) -> Callable[[dict[str, Any], dict[str, Any], torch.Tensor], None]:
    """A bias over key positions that the model builds from something other than ``position_ids`` (the
    attention mask, or a table over ``max_seq_len``): the reference takes the bias of the full sequence's call
    and keeps the selected keys, so each key keeps its original position. The bias's last axis is the keys'."""

    def rule(sub: dict[str, Any], full: dict[str, Any], idx: torch.Tensor) -> None:
        bias = full[name]
        if bias.shape[-1] > _LENGTH:  # a table over max_seq_len, whose last T columns are this sequence's
            bias = bias[..., -_LENGTH:]
        sub[name] = bias.index_select(-1, idx[0])  # one row at a time: idx is [1, k]

    return rule


def _positions_at_selected(sub: dict[str, Any], full: dict[str, Any], idx: torch.Tensor) -> None:
    """The model renumbered the subsequence's positions itself (from the attention mask's running count, or
    from ``cache_position``): the reference takes the position ids and rotary tables of the full sequence's
    call at the selected tokens, so each token keeps its original position."""
    rows = torch.arange(idx.shape[0])[:, None]
    for name in ("position_ids", "position_embeddings"):
        value = full.get(name)
        if torch.is_tensor(value):
            sub[name] = value.expand(idx.shape[0], *value.shape[1:])[rows, idx]
        elif isinstance(value, tuple):
            sub[name] = tuple(v.expand(idx.shape[0], *v.shape[1:])[rows, idx] for v in value)


def _masks_at_selected(sub: dict[str, Any], full: dict[str, Any], idx: torch.Tensor) -> None:
    """A sliding window counts positions: the model builds the subsequence's mask over its k indices, where for
    Mixture-of-Depths a token keeps its original position. The reference takes the full sequence's 4-D masks
    at the selected queries and keys (one row at a time)."""
    keep = idx[0]
    for name, value in full.items():
        if torch.is_tensor(value) and value.dim() == 4 and value.shape[-1] == value.shape[-2] == _LENGTH:
            sub[name] = value[..., keep, :][..., keep]


#: A sliding window this short, so that the check's 16 tokens reach past it (the tiny configs' are 4096).
WINDOW = 5


@contextlib.contextmanager
def _short_window(model: nn.Module) -> Iterator[bool]:
    """Inside, a model whose config has a sliding window uses one of :data:`WINDOW` positions; yields whether."""
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}.values()
    saved = [(c, c.sliding_window) for c in configs if isinstance(getattr(c, "sliding_window", None), int)]
    for c, _ in saved:
        c.sliding_window = WINDOW
    try:
        yield bool(saved)
    finally:
        for c, value in saved:
            c.sliding_window = value


#: model_type -> how the reference gives each token its original position, where ``position_ids`` don't.
POSITION_RULES: dict[str, Callable[[dict[str, Any], dict[str, Any], torch.Tensor], None]] = {
    "bloom": _alibi_keys_at_positions("alibi"),  # ALiBi from the attention mask's running count
    "mpt": _alibi_keys_at_positions("position_bias"),  # ALiBi from a table over max_seq_len, sliced last-k
}


@contextlib.contextmanager
def _capture(block: nn.Module, store: dict[str, Any], stop: bool) -> Iterator[None]:
    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        store["args"], store["kwargs"] = args, dict(kwargs)
        if stop:
            raise _Stop

    def post(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        store["output"] = output[0] if isinstance(output, tuple) else output

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True)]
    if not stop:
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _hidden(store: dict[str, Any]) -> torch.Tensor:
    return store["args"][0] if store["args"] else store["kwargs"]["hidden_states"]


def _with_hidden(store: dict[str, Any], x: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args, kwargs = list(store["args"]), dict(store["kwargs"])
    if args:
        args[0] = x
    else:
        kwargs["hidden_states"] = x
    return tuple(args), kwargs


def _call_args(model: nn.Module, block: nn.Module, **inputs: Any) -> dict[str, Any]:
    store: dict[str, Any] = {}
    with _capture(block, store, stop=True), torch.no_grad():
        try:
            model(**inputs, use_cache=False)
        except _Stop:
            pass
    if "args" not in store:
        raise UnverifiedError("the block did not run on the subsequence")
    return store


def reference_error(
    model: nn.Module, index: int, ids: torch.Tensor, dense: bool = False, windowed: bool = False
) -> float:
    """max |routed - reference| / max |x| for block ``index`` of a converted ``model`` (only that block routed);
    with ``dense``, the dense block's output in place of the routed one (to check the reference itself)."""
    (block, state), *others = [(b, s) for b, s in routed_blocks(model) if s.index == index]
    assert not others
    router = block.mod_router
    with torch.no_grad():
        router.scale.fill_(_GATE_SCALE)  # gates differ from 1, so the reference checks the gating too
    routed: dict[str, Any] = {}
    with _capture(block, routed, stop=False), torch.no_grad():
        with modify.routing_disabled(model) if dense else contextlib.nullcontext():
            model(input_ids=ids, use_cache=False)
    x, y = _hidden(routed), routed["output"]
    batch, length, _ = x.shape
    with torch.no_grad():
        scores = router(x)
    k = math.ceil(state.capacity * length)
    idx = torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values
    rows = torch.arange(batch)[:, None]
    selected = x[rows, idx]
    gate = 2 * torch.sigmoid(router.scale * scores[rows, idx])
    if dense:
        gate = torch.ones_like(gate)  # the dense block adds all of Δ
    reference = x.clone()
    # One sequence at a time: some families pass the block arguments shared by the batch (MPT's ALiBi table),
    # which can't hold two rows' positions.
    for b in range(batch):
        out = _reference_block(model, block, ids[b : b + 1], selected[b : b + 1], idx[b : b + 1], windowed)
        reference[b, idx[b]] = selected[b] + gate[b, :, None].to(x.dtype) * (out[0] - selected[b])
    return float((y - reference).abs().max().detach() / x.abs().max())


def _reference_block(
    model: nn.Module, block: nn.Module, ids: torch.Tensor, selected: torch.Tensor, idx: torch.Tensor, windowed: bool
) -> torch.Tensor:
    """The original block on one row's selected tokens, with the arguments the model computes for them."""
    with modify.routing_disabled(model):
        sub = _call_args(model, block, inputs_embeds=selected, position_ids=idx, attention_mask=torch.ones_like(idx))
        rules = [POSITION_RULES.get(getattr(model.config, "model_type", ""))]
        given = sub["kwargs"].get("position_ids")
        if rules[0] is None and torch.is_tensor(given) and not torch.equal(given.expand_as(idx), idx):
            rules.append(_positions_at_selected)
        if windowed:
            rules.append(_masks_at_selected)
        if any(rules):
            full = _call_args(model, block, input_ids=ids)
            for rule in filter(None, rules):
                rule(sub["kwargs"], full["kwargs"], idx)
        args, kwargs = _with_hidden(sub, selected)
        with torch.no_grad():
            out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def check_reference(model: nn.Module, ids: torch.Tensor | None = None) -> float:
    """The worst :func:`reference_error` over every routable block of ``model`` (converted one at a time, a
    sliding window cut to :data:`WINDOW` positions); raises AssertionError over :data:`TOLERANCE` and
    :class:`UnverifiedError` where no reference can be built."""
    with _short_window(model) as windowed:
        return _check_reference(model, ids, windowed)


def _check_reference(model: nn.Module, ids: torch.Tensor | None, windowed: bool) -> float:
    vocab = model.config.get_text_config().vocab_size
    if ids is None:
        # No token twice in a row: a first block's input is the token's embedding alone, and equal scores would
        # make the choice a matter of tie-breaking rather than of routing.
        generator = torch.Generator().manual_seed(11)
        ids = torch.stack([torch.randperm(vocab - 3, generator=generator)[:_LENGTH] + 3 for _ in range(_BATCH)])
    worst = 0.0
    infos = modify.find_blocks(model, strict=False)
    for info in infos:
        if info.form == "unroutable":
            continue
        # At capacity 1.0 the reference must give the dense block's output, or it doesn't rebuild the call.
        error = _block_error(model, info.index, ids, 1.0, dense=True, windowed=windowed)
        if not error <= TOLERANCE:
            raise UnverifiedError(f"the reference differs from the dense block {info.index} by {error:.1e}")
        error = _block_error(model, info.index, ids, _CAPACITY, windowed=windowed)
        if not error <= TOLERANCE:
            raise AssertionError(f"block {info.index} differs from the reference at c < 1 by {error:.1e}")
        worst = max(worst, error)
    return worst


def _block_error(
    model: nn.Module, index: int, ids: torch.Tensor, capacity: float, dense: bool = False, windowed: bool = False
) -> float:
    modify.convert(model, capacity=capacity, layers=[index])
    try:
        return reference_error(model, index, ids, dense, windowed)
    except (UnverifiedError, AssertionError, modify.UnsupportedModelError):
        raise
    except Exception as exc:  # noqa: BLE001 - the family's own code refused the subsequence call
        raise UnverifiedError(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}") from exc
    finally:
        modify.revert(model)


def kv_all_reference_error(model: nn.Module, index: int, ids: torch.Tensor) -> float:
    """max |routed - reference| / max |x| for block ``index`` of a model converted with ``kv="all"`` (only that
    block routed). The reference is the family's own block run on every token, its Δ kept, gated, at the k
    highest router scores of each row only: what a routed token computes when it attends to every token."""
    (block, state), *others = [(b, s) for b, s in routed_blocks(model) if s.index == index]
    assert not others
    router = block.mod_router
    with torch.no_grad():
        router.scale.fill_(_GATE_SCALE)
    routed: dict[str, Any] = {}
    dense: dict[str, Any] = {}
    with torch.no_grad():
        with _capture(block, routed, stop=False):
            model(input_ids=ids, use_cache=False)
        with _capture(block, dense, stop=False), modify.routing_disabled(model):
            model(input_ids=ids, use_cache=False)
        x, y = _hidden(routed), routed["output"]
        scores = router(x)
        k = math.ceil(state.capacity * x.shape[1])
        idx = torch.topk(scores, k, dim=-1).indices
        keep = torch.zeros_like(scores).scatter_(1, idx, 1.0)
        gate = 2 * torch.sigmoid(router.scale * scores) * keep
        reference = x + gate[..., None].to(x.dtype) * (dense["output"] - x)
    return float((y - reference).abs().max() / x.abs().max())


def check_kv_all_reference(model: nn.Module, ids: torch.Tensor | None = None) -> float:
    """The worst :func:`kv_all_reference_error` over every routable block of ``model``, each converted alone at
    capacity 0.5 with ``kv="all"`` (a sliding window cut to :data:`WINDOW` positions); raises AssertionError over
    :data:`TOLERANCE`, and UnsupportedModelError where the block's attention can't be split."""
    with _short_window(model):
        vocab = model.config.get_text_config().vocab_size
        if ids is None:
            generator = torch.Generator().manual_seed(11)
            ids = torch.stack([torch.randperm(vocab - 3, generator=generator)[:_LENGTH] + 3 for _ in range(_BATCH)])
        worst = 0.0
        for info in modify.find_blocks(model, strict=False):
            if info.form == "unroutable":
                continue
            modify.convert(model, capacity=_CAPACITY, layers=[info.index], kv="all")
            try:
                error = kv_all_reference_error(model, info.index, ids)
            finally:
                modify.revert(model)
            if not error <= TOLERANCE:
                raise AssertionError(f"block {info.index} (kv='all') differs from the reference by {error:.1e}")
            worst = max(worst, error)
        return worst
