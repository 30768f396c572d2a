"""Distillation from the original model: the loss, the teacher, and held-out KL.

The loss of one micro-batch (``modify train --distill``), per predicted token::

    (1 − W) · CE(student, next token) + W · τ² · KL(p_teacher^τ ‖ p_student^τ) + W_h · hidden

with W ``--distill-weight``, τ ``--distill-temperature``, p^τ the softmax of the logits over τ, and the
optional hidden term (``--distill-hidden W_h``) the residual stream after each routed block against the
teacher's at the same block, each block's squared error over the teacher's mean square, averaged over blocks.

Both logit terms are computed in chunks of tokens by one autograd function that also writes the gradient
with respect to the student's logits during the forward: a chunk is upcast to float32, used and dropped, so
no float32 copy of a [tokens × vocabulary] tensor is made (the logits stay in the compute dtype, and autograd
saves no softmax). Each token's terms land in a buffer summed once at the end, so the result does not depend
on the chunk size. The gradients, per token and over the N predicted tokens:

    ∂/∂z_s = (1 − W) · (softmax(z_s) − onehot(y)) / N + W · τ · (softmax(z_s / τ) − p_teacher^τ) / N

The teacher is the conversion's source (see :class:`Teacher`): the student itself with routing and adapters
off (and any trained norm put back) when only routers, norms, skip paths or adapters learn, else a frozen
model. For ``transformers.Trainer`` users, :class:`DistillationTrainer` adds the same loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from transformers import Trainer

from modify.api import routing_disabled
from modify.errors import ModifyError
from modify.model_hooks import aux_loss_coef
from modify.train.trainable import _is_router, _is_skip_path, _norm_parameters, base_model

__all__ = [
    "DistillParts",
    "distill_loss",
    "kl_per_token",
    "hidden_loss",
    "Teacher",
    "DistillationTrainer",
    "IGNORE_INDEX",
]

#: Label of a position that predicts nothing (transformers' convention).
IGNORE_INDEX = -100
#: Tokens per chunk: at a 49k vocabulary, two float32 chunks and their softmaxes are ~200 MB.
DEFAULT_CHUNK = 1024


@dataclass(frozen=True)
class DistillParts:
    """The loss to train on and its parts, detached (means over the predicted tokens)."""

    loss: torch.Tensor
    lm: torch.Tensor
    kd: torch.Tensor


class _FusedDistill(torch.autograd.Function):
    """(1 − W)·CE + W·τ²·KL over rows of logits, chunk by chunk; the student's gradient computed in forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, student: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor,
        weight: float, temperature: float, chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        rows = student.shape[0]
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1).to(torch.float32)
        ce_rows = torch.zeros(rows, dtype=torch.float32, device=student.device)
        kl_rows = torch.zeros(rows, dtype=torch.float32, device=student.device)
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        safe = targets.clamp(min=0)
        for start in range(0, rows, chunk):
            part = slice(start, min(rows, start + chunk))
            z = student[part].float()
            keep = valid[part].unsqueeze(-1).float()
            logp = torch.log_softmax(z, dim=-1)
            ce_rows[part] = -logp.gather(-1, safe[part].unsqueeze(-1)).squeeze(-1) * keep.squeeze(-1)
            g = None
            if grad is not None:
                g = logp.exp_().scatter_add_(-1, safe[part].unsqueeze(-1), -torch.ones_like(keep))
                g.mul_((1.0 - weight) / count)
            del logp
            if teacher is not None:  # logged at W = 0 too
                log_s = torch.log_softmax(z / temperature, dim=-1)
                log_t = torch.log_softmax(teacher[part].float() / temperature, dim=-1)
                p_t = log_t.exp()
                kl_rows[part] = (p_t * (log_t - log_s)).sum(-1) * keep.squeeze(-1)
                if g is not None:
                    g.add_((log_s.exp_() - p_t).mul_(weight * temperature / count))
                del log_s, log_t, p_t
            if grad is not None:
                grad[part] = (g * keep).to(grad.dtype)
        ce, kl = ce_rows.sum() / count, kl_rows.sum() / count
        ctx.save_for_backward(grad)
        total = (1.0 - weight) * ce + weight * temperature**2 * kl
        parts = torch.stack([ce, kl])
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, _grad_parts: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad * grad_total.to(grad.dtype) if grad is not None else None, None, None, None, None, None)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    weight: float,
    temperature: float = 1.0,
    chunk: int = DEFAULT_CHUNK,
) -> DistillParts:
    """The distillation loss of a causal LM's batch (see the module docstring).

    Args:
        student_logits: [B, T, V] (any float dtype; differentiable).
        teacher_logits: [B, T, V] of the same vocabulary, or None (the LM loss alone, W must be 0).
        labels: [B, T] token ids; position t predicts ``labels[:, t + 1]``; IGNORE_INDEX predicts nothing.
        weight: W in [0, 1].
        temperature: τ > 0.
        chunk: tokens per chunk.
    """
    if teacher_logits is not None and teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ModifyError(
            f"the teacher's vocabulary has {teacher_logits.shape[-1]} entries and the student's "
            f"{student_logits.shape[-1]}; distil from a model with the student's tokenizer"
        )
    vocab = student_logits.shape[-1]
    student = student_logits[:, :-1].reshape(-1, vocab)
    teacher = teacher_logits[:, :-1].reshape(-1, vocab) if teacher_logits is not None else None
    targets = labels[:, 1:].reshape(-1).to(student.device)
    total, parts = _FusedDistill.apply(student, teacher, targets, float(weight), float(temperature), int(chunk))
    return DistillParts(total, parts[0], parts[1])


def kl_per_token(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """[N] KL(p_teacher^τ ‖ p_student^τ) of each row of [N, V] logits, in float32, chunk by chunk (no grad)."""
    out = torch.empty(student_logits.shape[0], dtype=torch.float32, device=student_logits.device)
    with torch.no_grad():
        for start in range(0, student_logits.shape[0], chunk):
            part = slice(start, start + chunk)
            log_s = torch.log_softmax(student_logits[part].float() / temperature, dim=-1)
            log_t = torch.log_softmax(teacher_logits[part].float() / temperature, dim=-1)
            out[part] = (log_t.exp() * (log_t - log_s)).sum(-1)
    return out


def hidden_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of ‖h_s − h_t‖² / ‖h_t‖² (float32): each block's residual stream against the teacher's."""
    terms = []
    for s, t in zip(student, teacher, strict=True):
        t = t.detach().float()
        terms.append((s.float() - t).pow(2).mean() / t.pow(2).mean().clamp(min=1e-12))
    return torch.stack(terms).mean()


def block_outputs(hidden_states: Sequence[torch.Tensor], blocks: Sequence[int]) -> list[torch.Tensor]:
    """The residual stream after each of ``blocks`` from a Hugging Face ``hidden_states`` tuple.

    ``hidden_states[i + 1]`` is block i's output, except the last entry, which is the final norm's output
    in place of the last block's: for the last block that is what is compared (normalised either way).
    """
    return [hidden_states[min(i + 1, len(hidden_states) - 1)] for i in blocks]


class Teacher:
    """The model the student is distilled from: the conversion's source.

    Args:
        student: the model being trained (a peft model for LoRA); with ``frozen`` None it is its own teacher:
            routing off (``modify.routing_disabled``), peft's adapters off, and every trained parameter in
            ``restore`` put back to its value at the start for the teacher's forward.
        frozen: a separate model in eval mode without gradients (``--train full``, or ``--teacher SRC``).
        restore: the student's trained base parameters (norms) whose start values the self-teacher needs.
    """

    def __init__(
        self, student: nn.Module, frozen: nn.Module | None = None, restore: Sequence[nn.Parameter] = ()
    ) -> None:
        self.student = student
        self.frozen = frozen
        if frozen is not None:
            frozen.eval().requires_grad_(False)
        self.restore = list(restore)
        self.start = [p.detach().clone() for p in self.restore]

    @contextlib.contextmanager
    def _as_original(self) -> Iterator[None]:
        disable = getattr(self.student, "disable_adapter", None)
        trained = [p.detach().clone() for p in self.restore]
        was_training = self.student.training
        with torch.no_grad():
            for p, start in zip(self.restore, self.start):
                p.copy_(start)
        try:
            with routing_disabled(self.student), disable() if callable(disable) else contextlib.nullcontext():
                self.student.eval()
                yield
        finally:
            self.student.train(was_training)
            with torch.no_grad():
                for p, value in zip(self.restore, trained):
                    p.copy_(value)

    def __call__(self, model: nn.Module, ids: torch.Tensor, hidden: bool = False) -> Any:
        """The teacher's output on ``ids`` (no grad). ``model`` is the student as the loop calls it (its DDP or
        FSDP wrapper), which the self-teacher runs through."""
        kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
        if hidden:
            kwargs["output_hidden_states"] = True
        with torch.no_grad():
            if self.frozen is not None:
                return self.frozen(**kwargs)
            with self._as_original():
                return model(**kwargs)


#: ``--train`` modes that leave the base weights as converted: their output with routing off is still the source.
_BASE_KEPT = ("routers", "routers+skip")


def trained_by(model: str) -> str:
    """The ``--train`` of the ``modify train`` run that wrote the directory ``model`` (its train_config.yaml),
    when that run moved base weights (merged LoRA included); "" otherwise."""
    record = Path(model).expanduser() / "train_config.yaml"
    if not record.is_file():
        return ""
    try:
        mode = (yaml.safe_load(record.read_text()) or {}).get("train", "")
    except (yaml.YAMLError, OSError, AttributeError):
        return ""
    return mode if isinstance(mode, str) and mode not in _BASE_KEPT else ""


def vocabulary_check(student: nn.Module, teacher: nn.Module, student_tok: Any, teacher_tok: Any, name: str) -> None:
    """Refuse a teacher whose vocabulary is not the student's, in one line."""
    sizes = [m.get_output_embeddings().weight.shape[0] for m in (student, teacher)]
    same_tokens = student_tok is None or teacher_tok is None or student_tok.get_vocab() == teacher_tok.get_vocab()
    if sizes[0] != sizes[1] or not same_tokens:
        detail = f"{sizes[1]} logits against the student's {sizes[0]}" if sizes[0] != sizes[1] else "other tokens"
        raise ModifyError(
            f"teacher {name} has another vocabulary ({detail}); give --teacher a model with the student's tokenizer"
        )


def _self_teacher_restore(model: nn.Module) -> list[nn.Parameter]:
    """The trained base parameters the self-teacher puts back (norms), as ``modify train`` picks them; refuses
    base weights of any other kind that train, which the student's forward can't undo (see DistillationTrainer)."""
    norms = _norm_parameters(model)  # what --train routers+norms trains
    base = [
        (name, p) for name, p in model.named_parameters()
        if p.requires_grad and not (_is_router(name) or _is_skip_path(name) or ".lora_" in name)
    ]  # fmt: skip
    moving = [name for name, p in base if id(p) not in norms]
    if moving:
        raise ModifyError(
            f"{len(moving)} base weights train ({moving[0]}, ...), so the model with routing off is no longer the "
            "original to distil from; pass teacher= a copy of the original model (loaded again), or train only "
            "routers, norms, skip paths or adapters (modify.train.trainable.prepare_trainable(model, 'routers'))"
        )
    return [p for _, p in base]


class DistillationTrainer(Trainer):
    """``transformers.Trainer`` with ``modify train --distill``'s loss.

    Usage::

        from modify.train.distill import DistillationTrainer
        from modify.train.trainable import prepare_trainable
        converted = prepare_trainable(converted, "routers+norms")  # base weights that don't move
        trainer = DistillationTrainer(model=converted, args=args, train_dataset=data,
                                      distill_weight=1.0, distill_temperature=1.0)  # teacher: the model itself
        trainer.train()

    Args (besides ``Trainer``'s):
        teacher: a frozen model of the student's vocabulary; None: the student with routing (and peft
            adapters) off and any trained norm put back to its value when the trainer was made, as
            ``modify train`` does (routers, norms, skip paths or LoRA training). Where other base weights
            train (``requires_grad`` when the trainer is made), the student is no longer the original model:
            pass a copy of it (loaded again) as the teacher, or the trainer refuses.
        distill_weight, distill_temperature: W and τ.
        chunk: tokens per chunk of the loss.

    Labels of -100 (padding, prompts) are left out of both terms, as transformers does for the LM loss; without
    a ``labels`` column the inputs are the labels, and the positions ``attention_mask`` marks 0 predict nothing.
    With gradient accumulation the loss of a micro-batch is its share of the accumulated batch's predicted
    tokens (transformers' ``num_items_in_batch``), so the update doesn't depend on how the batch is split;
    without that count (no ``labels`` column) it is the micro-batch's mean, which Trainer divides by the steps.
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module | None = None,
        distill_weight: float = 1.0,
        distill_temperature: float = 1.0,
        chunk: int = DEFAULT_CHUNK,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= distill_weight <= 1.0 or not distill_temperature > 0:
            raise ModifyError(
                f"distill_weight must be in [0, 1] and distill_temperature > 0, got {distill_weight}, "
                f"{distill_temperature}"
            )
        restore: list[nn.Parameter] = []
        if teacher is not None:
            teacher.to(self.args.device)
        else:
            restore = _self_teacher_restore(self.model)
        self.distill_weight, self.distill_temperature, self.chunk = distill_weight, distill_temperature, chunk
        self.teacher = Teacher(self.model, teacher, restore=restore)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        labels = inputs.get("labels")
        if labels is None:
            labels = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            if mask is not None:
                labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        teacher_out = None
        if self.distill_weight > 0:
            with torch.no_grad():
                teacher_out = (
                    self.teacher.frozen(**forward) if self.teacher.frozen is not None else self._self_teacher(forward)
                )
        out = model(**forward)
        parts = distill_loss(
            out.logits,
            teacher_out.logits if teacher_out is not None else None,
            labels,
            self.distill_weight,
            self.distill_temperature,
            self.chunk,
        )
        loss = parts.loss
        aux = getattr(out, "aux_loss", None)
        if aux is not None:  # a converted model's causal-routing loss, at the coefficient its plan gives
            coef = aux_loss_coef(base_model(self.accelerator.unwrap_model(model)))
            loss = loss + (coef or 0.0) * aux
        if num_items_in_batch is not None:
            # Given the count, transformers 5 sums the micro-batches' losses without dividing by the accumulation
            # steps: each is weighted by its share of the batch's predicted tokens, as its own LM loss is.
            predicted = (labels[:, 1:] != IGNORE_INDEX).sum()
            loss = loss * (predicted.to(loss.device) / num_items_in_batch)
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # the count is of every process's tokens
        return (loss, out) if return_outputs else loss

    def _self_teacher(self, forward: dict[str, Any]) -> Any:
        with self.teacher._as_original():
            return self.model(**forward)
