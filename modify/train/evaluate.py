"""Held-out evaluation: next-token loss, perplexity, throughput and FLOPs per token of a causal LM.

Used by ``modify eval`` and by the training loop. The loss is the mean cross entropy over every predicted
token (the sum of token losses over the count, both summed over all batches, and over ranks through
``reduce``), not a mean of per-batch means, so it does not depend on how the tokens are batched.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from modify.errors import UnsupportedModelError
from modify.flops import flops

__all__ = ["EvalResult", "evaluate"]


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` measured.

    Attributes:
        loss: mean next-token cross entropy in nats over ``predicted_tokens`` (nan when there were none).
        ppl: ``exp(loss)``.
        tokens: input tokens evaluated (B·T summed over batches and ranks).
        seconds: wall time of the evaluation on this rank.
        tokens_per_second: ``tokens / seconds``.
        flops_per_token: analytic forward FLOPs per input token of the model as it is (routed for a converted
            model, dense otherwise; see :func:`modify.flops`), nan for a model without a block stack.
        predicted_tokens: tokens the loss is averaged over, B·(T − 1) per batch: each sequence's first token
            has no prediction.
        kl: mean KL(teacher ‖ model) of the next-token distributions over the predicted tokens, with a
            ``teacher``; else nan.
    """

    loss: float
    ppl: float
    tokens: int
    seconds: float
    tokens_per_second: float
    flops_per_token: float
    predicted_tokens: int = 0
    kl: float = math.nan


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    # Hugging Face models: no KV cache (nothing is generated); any other model gets the ids alone.
    out = model(input_ids=ids, use_cache=False) if hasattr(model, "config") else model(ids)
    return out.logits if hasattr(out, "logits") else out


def _forward_flops(model: nn.Module, seq_len: int) -> float:
    try:
        return float(flops(model, seq_len).routed)
    except UnsupportedModelError:
        return math.nan


def evaluate(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    autocast_dtype: torch.dtype | None = None,
    max_batches: int | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``batches`` of token ids.

    Args:
        model: a causal language model (a Hugging Face one, converted or not, or any module whose output is
            the logits or has ``.logits``). Runs in eval mode under ``torch.no_grad()``; its train/eval mode is
            restored afterwards.
        batches: LongTensor ``[B, T]`` token ids, moved to the model's device; each position predicts the next.
        autocast_dtype: run the forward under ``torch.autocast`` in this dtype (None: the model's own dtype).
            The cross entropy is always taken in float32.
        max_batches: stop after this many batches (None: all of them).
        teacher: ids -> logits of a model of the same vocabulary, called under the same autocast: the result's
            ``kl`` is then the held-out KL from it (see :mod:`modify.train.distill`).
        reduce: applied to a float64 tensor ``[loss sum, predicted tokens, input tokens, KL sum]`` before dividing,
            e.g. an all-reduce SUM across ranks (it must return the reduced tensor). Every rank must call
            it, so a rank with no batches still does, and its result counts what the others saw.

    Returns:
        An :class:`EvalResult`. With no tokens at all, loss and ppl are nan and tokens 0 (no error, so that
        a rank without data does not leave the others waiting in ``reduce``).
    """
    if teacher is not None:
        # import time: modify.train.distill imports transformers.Trainer and peft (about 1.5 s); only the KL needs it
        from modify.train.distill import kl_per_token
    device = next(model.parameters()).device
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    flops_total = 0.0
    flops_by_length: dict[int, float] = {}
    was_training = model.training
    model.eval()
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for ids in itertools.islice(batches, max_batches):
                if ids.dim() != 2 or ids.shape[1] < 2:
                    raise ValueError(f"batches must be [B, T] token ids with T >= 2, got shape {tuple(ids.shape)}")
                ids = ids.to(device=device, dtype=torch.long)
                with autocast:
                    logits = _logits(model, ids)
                targets = ids[:, 1:]
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
                )
                kl = totals.new_zeros(())
                if teacher is not None:
                    with autocast:
                        reference = teacher(ids)
                    vocab = logits.shape[-1]
                    rows = kl_per_token(logits[:, :-1].reshape(-1, vocab), reference[:, :-1].reshape(-1, vocab))
                    kl = rows.double().sum()
                    del reference
                totals += torch.stack(
                    [loss.double(), totals.new_tensor(targets.numel()), totals.new_tensor(ids.numel()), kl]
                )
                length = ids.shape[1]
                if length not in flops_by_length:
                    flops_by_length[length] = _forward_flops(model, length)
                flops_total += flops_by_length[length] * ids.shape[0]
    finally:
        model.train(was_training)
    local_tokens = int(totals[2].item())
    seconds = time.perf_counter() - start
    if reduce is not None:
        totals = reduce(totals)
    loss_sum, predicted, tokens, kl_sum = (float(v) for v in totals.tolist())
    loss = loss_sum / predicted if predicted else math.nan
    return EvalResult(
        loss=loss,
        ppl=math.inf if loss > 709 else math.exp(loss),  # exp overflows a float beyond ~709.78; nan stays nan
        tokens=int(tokens),
        seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else math.inf,
        flops_per_token=flops_total / local_tokens if local_tokens else math.nan,
        predicted_tokens=int(predicted),
        kl=kl_sum / predicted if teacher is not None and predicted else math.nan,
    )
