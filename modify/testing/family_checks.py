"""The support matrix's checks of one family's tiny model, one function per column of the table.

Each check converts the model, checks one thing and leaves the model as it found it (reverted, in eval mode):

- ``identity``: capacity 1.0 on every block reproduces the logits (1e-4; padded batch and plain batch);
- ``reference``: at capacity 0.5 each routed block equals an independent reference built from the family's
  own model code (:mod:`modify.testing.reference`), or the family is "unverified at c < 1";
- ``generate``: greedy decoding with the causal rule (capacity 0.5 on every other block, thresholds fitted on
  random text) gives the same tokens with the cache as recomputing without it, and a left-padded batch row
  the same tokens as its prompt alone;
- ``flops``: ``modify.flops`` equals the measured FLOPs (``FlopCounterMode``, experts run as a loop of
  linears so the counter sees them), dense and with the paper's plan (every other block at 12.5%);
- ``padding``: the paper's plan never selects a padding token while real tokens remain;
- ``trains``: the paper's plan trains: finite loss, finite and non-zero router gradients;
- ``revert``: ``modify.revert`` gives back the original logits exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

import modify
from modify.api import is_converted, routed_blocks
from modify.flops import flop_counter
from modify.testing.reference import check_kv_all_reference, check_reference

__all__ = ["COLUMNS", "CHECKS", "Inputs", "eager_experts", "logits"]

_BATCH, _LENGTH, _PAD = 2, 32, 5
_PROMPT, _NEW = 8, 6


@dataclass
class Inputs:
    """A family's test inputs and the dense model's outputs on them."""

    ids: torch.Tensor
    mask: torch.Tensor  # row 0 left padded, row 1 right padded
    dense: torch.Tensor
    dense_masked: torch.Tensor
    measured_dense: int

    @classmethod
    def of(cls, model: Any) -> Inputs:
        vocab = model.config.get_text_config().vocab_size
        ids = torch.randint(3, max(vocab, 4), (_BATCH, _LENGTH), generator=torch.Generator().manual_seed(7))
        mask = torch.ones_like(ids)
        mask[0, :_PAD] = 0
        mask[1, -_PAD:] = 0
        return cls(ids, mask, logits(model, ids), logits(model, ids, mask), measured(model, ids))


@contextlib.contextmanager
def eager_experts(model: Any) -> Iterator[Any]:
    """Inside, Mixture-of-Experts layers run their experts as a loop of linears, which torch's FLOP counter
    sees itself (the default grouped matmuls it doesn't). A model without switchable experts is left as it is."""
    try:
        previous = model.get_experts_implementation()
        model.set_experts_implementation("eager")
    except Exception:  # noqa: BLE001 - no switchable experts
        previous = None
    try:
        yield model
    finally:
        if previous is not None:
            model.set_experts_implementation(previous)


def measured(model: Any, ids: Any) -> int:
    """torch's FLOP counter (totals only) on a forward with eager experts: ``modify.flops`` counts the default
    grouped expert matmuls by its own formula, so this checks that too."""
    with eager_experts(model), torch.no_grad(), flop_counter() as counter:
        model(input_ids=ids, use_cache=False)
    return counter.get_total_flops()


def logits(model: Any, ids: Any, mask: Any = None) -> Any:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.logits.float()


def _identity(model: Any, inputs: Inputs) -> None:
    modify.convert(model, capacity=1.0, layers="all")
    real = inputs.mask.bool()
    for got, want, where in (
        (logits(model, inputs.ids, inputs.mask), inputs.dense_masked, real),
        (logits(model, inputs.ids), inputs.dense, None),
    ):
        err = (got - want).abs()
        err = err[where] if where is not None else err
        if not err.max() <= 1e-4:
            raise AssertionError(f"capacity 1.0 changed the logits by {err.max():.2e}")


def _reference(model: Any, inputs: Inputs) -> None:
    check_reference(model)


def _kv_all(model: Any, inputs: Inputs) -> None:
    check_kv_all_reference(model)


def _greedy(model: Any, prompt: torch.Tensor, mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(
            prompt, attention_mask=mask, max_new_tokens=_NEW, do_sample=False, pad_token_id=0, **kwargs
        )
    return out[:, prompt.shape[1] :]


def _generate(model: Any, inputs: Inputs) -> None:
    modify.convert(model, capacity=0.5, layers="every-other")
    modify.fit_thresholds(model, [inputs.ids])
    prompt = inputs.ids[:1, :_PROMPT]
    cached = _greedy(model, prompt)
    if not torch.equal(cached, _greedy(model, prompt, use_cache=False)):
        raise AssertionError("greedy tokens with the cache differ from recomputing without it")
    short = inputs.ids[1:, 3:_PROMPT]
    batch = torch.cat([prompt, torch.cat([torch.zeros_like(prompt[:, :3]), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    if not torch.equal(_greedy(model, batch, mask)[1], _greedy(model, short)[0]):
        raise AssertionError("a left-padded batch row's tokens differ from its prompt's alone")


def _flops(model: Any, inputs: Inputs) -> None:
    modify.convert(model, capacity=0.125, layers="every-other")
    count = modify.flops(model, _LENGTH, _BATCH)
    routed = measured(model, inputs.ids)
    if (count.dense, count.routed) != (inputs.measured_dense, routed):
        raise AssertionError(
            f"modify.flops gives {count.dense} dense / {count.routed} routed, measured {inputs.measured_dense} / "
            f"{routed}"
        )


def _padding(model: Any, inputs: Inputs) -> None:
    modify.convert(model, capacity=0.125, layers="every-other")
    real = inputs.mask.bool()
    picked: list[torch.Tensor] = []
    handles = [s.hooks.add_selection(lambda scores, idx, gate: picked.append(idx)) for _, s in routed_blocks(model)]
    try:
        logits(model, inputs.ids, inputs.mask)
    finally:
        for handle in handles:
            handle.remove()
    if not picked:
        raise AssertionError("no routed block selected tokens")
    for idx in picked:
        if not real.gather(1, idx.cpu()).all():
            blind = [s.name for _, s in routed_blocks(model) if s.spec.pairwise is None and s.spec.padding_mask is None]
            if blind:
                raise AssertionError(
                    f"{blind[0]} gets neither an attention mask nor a padding mask, so it can't tell padding from "
                    "real tokens"
                )
            raise AssertionError("a padding token was selected while real tokens remained")


def _trains(model: Any, inputs: Inputs) -> None:
    modify.convert(model, capacity=0.125, layers="every-other")
    model.train()
    real = inputs.mask.bool()
    # The loss from the logits, not the model's labels path (GIT's expects image tokens in front).
    out = model(input_ids=inputs.ids, attention_mask=inputs.mask, use_cache=False).logits.float()
    targets = inputs.ids.masked_fill(~real, -100)[:, 1:]
    loss = torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), targets.flatten())
    if not torch.isfinite(loss):
        raise AssertionError(f"the paper's plan gives loss {loss.item()}")
    loss.backward()
    # A fresh router's gate scale is 0 (every gate exactly 1): the scale gets gradient first, the weights once
    # it has moved; all of them must be finite.
    grads = [p.grad for n, p in model.named_parameters() if "mod_router" in n]
    if not grads or any(g is None or not torch.isfinite(g).all() for g in grads):
        raise AssertionError("a router got no gradient or a non-finite one")
    if not any(g.abs().sum() > 0 for g in grads):
        raise AssertionError("the router gradients are all zero")


def _revert(model: Any, inputs: Inputs) -> None:
    modify.convert(model, capacity=0.125, layers="every-other")
    modify.revert(model)
    if not torch.equal(logits(model, inputs.ids), inputs.dense):
        raise AssertionError("revert did not give back the original logits exactly")


#: (column, check), in the table's order.
CHECKS: tuple[tuple[str, Callable[[Any, Inputs], None]], ...] = (
    ("identity", _identity),
    ("reference", _reference),
    ("generate", _generate),
    ("flops", _flops),
    ("padding", _padding),
    ("trains", _trains),
    ("revert", _revert),
)
COLUMNS = tuple(name for name, _ in CHECKS)
#: Columns of options a family may be refused for without being unsupported: ``kv="all"`` at capacity 0.5
#: against its reference (the family's own block on every token), or the reason its attention can't be split.
OPTIONAL_CHECKS: tuple[tuple[str, Callable[[Any, Inputs], None]], ...] = (("kv=all", _kv_all),)
OPTIONAL_COLUMNS = tuple(name for name, _ in OPTIONAL_CHECKS)


def restore(model: Any) -> None:
    """The model as the checks found it: reverted, in eval mode, no gradients."""
    if is_converted(model):
        modify.revert(model)
    model.eval()
    model.zero_grad(set_to_none=True)
