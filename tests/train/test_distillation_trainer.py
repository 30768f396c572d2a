"""``DistillationTrainer`` (``transformers.Trainer`` with ``modify train --distill``'s loss) under what Trainer
users do (issue 30, items 3, 6 and 8):

- gradient accumulation: the same four sequences give the same update at batch 4, 2 × 2 and 1 × 4 (the loss
  is a share of the accumulated batch's token count, which transformers 5 passes as ``num_items_in_batch``);
- trained norms: the self-teacher puts them back for its forward, as ``modify train`` does, and base weights
  that train need an explicit teacher;
- no labels column: padding (``attention_mask`` 0) predicts nothing, as a ``labels`` of -100 there would say.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import modify
from modify.errors import ModifyError
from modify.testing import tiny_model
from modify.train.distill import IGNORE_INDEX, DistillationTrainer
from modify.train.trainable import prepare_trainable

IDS = torch.randint(3, 90, (4, 16), generator=torch.Generator().manual_seed(2))


def _args(tmp_path: Path, batch: int, accumulation: int, steps: int = 1, lr: float = 0.1):  # type: ignore[no-untyped-def]
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=steps, learning_rate=lr, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        weight_decay=0.0, report_to=[], use_cpu=True, save_strategy="no", seed=0,
    )  # fmt: skip


def _converted() -> nn.Module:
    return modify.convert(tiny_model("llama"), capacity=0.5, layers="every-other")


def _update(tmp_path: Path, batch: int, accumulation: int) -> torch.Tensor:
    """Every parameter's change after one SGD step on the four sequences, flattened."""
    student = _converted().train()
    teacher = tiny_model("llama")
    before = torch.cat([p.detach().flatten().clone() for p in student.parameters()])
    data = [{"input_ids": row, "labels": row} for row in IDS]
    trainer = DistillationTrainer(
        model=student, args=_args(tmp_path, batch, accumulation), train_dataset=data, teacher=teacher,
        distill_weight=0.5,
    )  # fmt: skip
    trainer.train()
    return torch.cat([p.detach().flatten() for p in student.parameters()]) - before


def test_gradient_accumulation_gives_the_same_update(tmp_path: Path) -> None:
    whole = _update(tmp_path / "4x1", 4, 1)
    assert whole.norm() > 0
    for batch, accumulation in ((2, 2), (1, 4)):
        split = _update(tmp_path / f"{batch}x{accumulation}", batch, accumulation)
        # the same sums in another order: float32 rounding, far below the factor 2 or 4 of scaling twice
        assert float((split - whole).norm() / whole.norm()) < 1e-4, (batch, accumulation)


def test_self_teacher_puts_trained_norms_back(tmp_path: Path) -> None:
    """Routers and norms train at a high rate; the teacher the loss reads stays the original model exactly."""
    original = tiny_model("llama")
    student = prepare_trainable(_converted(), "routers+norms")
    data = [{"input_ids": row, "labels": row} for row in IDS]
    trainer = DistillationTrainer(model=student, args=_args(tmp_path, 2, 1, steps=4, lr=0.5), train_dataset=data)
    trainer.train()
    norm = student.model.layers[0].input_layernorm.weight
    assert not torch.equal(norm, original.model.layers[0].input_layernorm.weight)  # the norms did train
    with torch.no_grad():
        expected = original(input_ids=IDS, use_cache=False).logits
        got = trainer.teacher(student, IDS).logits
    assert torch.equal(got, expected)


def test_base_weights_that_train_need_an_explicit_teacher(tmp_path: Path) -> None:
    student = prepare_trainable(_converted(), "full")
    data = [{"input_ids": row, "labels": row} for row in IDS]
    with pytest.raises(ModifyError) as info:
        DistillationTrainer(model=student, args=_args(tmp_path, 2, 1), train_dataset=data)
    assert "\n" not in str(info.value)
    DistillationTrainer(model=student, args=_args(tmp_path, 2, 1), train_dataset=data, teacher=tiny_model("llama"))


def test_without_labels_padding_predicts_nothing(tmp_path: Path) -> None:
    model = prepare_trainable(_converted(), "routers")
    mask = torch.ones_like(IDS)
    mask[0, -5:] = 0  # right padding
    mask[1, :4] = 0  # left padding
    ids = IDS.masked_fill(mask == 0, 0)
    trainer = DistillationTrainer(
        model=model, args=_args(tmp_path, 4, 1), train_dataset=[{"input_ids": r} for r in ids], distill_weight=0.5
    )
    without = trainer.compute_loss(model, {"input_ids": ids, "attention_mask": mask})
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    expected = trainer.compute_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert torch.equal(without, expected)
