"""A converted model trains under ``transformers.Trainer`` and TRL's ``SFTTrainer`` unchanged.

The data is learnable on purpose (each token is the previous one plus one), so that five steps at a high
learning rate lower the loss measurably: the test can fail if the routed forward or its gradients are wrong.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import modify
from modify.io.checkpoint import Source, save_converted
from modify.testing import tiny_model, tiny_tokenizer
from modify.train.evaluate import evaluate

SEQ_LEN = 24
STEPS = 5


def _sequences(count: int, seed: int = 0) -> torch.Tensor:
    """[count, SEQ_LEN] runs of consecutive token ids (3..96, wrapping), each from a random start."""
    starts = torch.randint(0, 94, (count, 1), generator=torch.Generator().manual_seed(seed))
    return (starts + torch.arange(SEQ_LEN)) % 94 + 3


def _converted() -> nn.Module:
    return modify.convert(tiny_model("llama"), capacity=0.5, layers="every-other")


def _routers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "router" in n}


def _training_args(tmp_path: Path, config_class: type | None = None, **extra: object) -> object:
    from transformers import TrainingArguments

    return (config_class or TrainingArguments)(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        **extra,
    )


def _check_trained(model: nn.Module, before: dict[str, torch.Tensor], log_history: list[dict]) -> list[float]:
    """Every step logged a finite loss, every router parameter moved, the routing is still there."""
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)
    after = _routers(model)
    assert after.keys() == before.keys() and len(after) == 6  # weight, bias, scale of blocks 1 and 3
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"router parameters not updated: {unchanged}"
    assert all(p.dtype == torch.float32 for p in after.values())
    assert [b.index for b in modify.find_blocks(model) if b.routed] == [1, 3]
    return losses


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("how", ["converted", "reloaded"])
def test_trainer(how: str, tmp_path: Path) -> None:
    """A fresh conversion, and one reloaded with modify.from_pretrained (no quantizer left to refuse training)."""
    from transformers import Trainer

    model = _converted()
    if how == "reloaded":
        out = save_converted(model, None, tmp_path / "converted", Source("directory", tmp_path))
        model = modify.from_pretrained(out)
        assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    held_out = list(_sequences(8, seed=1).split(4))
    loss_before = evaluate(model, held_out).loss
    before = _routers(model)
    trainer = Trainer(model=model, args=_training_args(tmp_path / "run"), train_dataset=_Sequences(_sequences(16)))
    trainer.train()
    _check_trained(model, before, trainer.state.log_history)
    assert evaluate(model, held_out).loss < loss_before - 0.1


def test_sft_trainer(tmp_path: Path) -> None:
    """TRL tokenises text of varying length itself and pads the batches: the routed blocks see padding (and
    SFTConfig turns gradient checkpointing on by default, so the routed forward is recomputed in backward)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = "<unk>"
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    gen = torch.Generator().manual_seed(0)
    texts = []
    for _ in range(16):
        start, length = (int(v) for v in torch.randint(0, 26, (2,), generator=gen))
        texts.append("".join(alphabet[(start + j) % 26] for j in range(12 + length)))
    model = _converted()
    before = _routers(model)
    trainer = SFTTrainer(
        model=model,
        args=_training_args(tmp_path, SFTConfig, max_length=64),
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.model is model
    losses = _check_trained(model, before, trainer.state.log_history)
    assert losses[-1] < losses[0] - 0.3  # 4.61 -> 3.61 here


def test_trainer_trains_the_causal_predictor(tmp_path: Path) -> None:
    """The predictor's loss rides in outputs.loss: Trainer trains it with nothing added, and its loss on held-out
    text falls. (A fresh predictor starts at the threshold rule's decisions, which already agree with top-k on
    about 93% of these tokens; five steps at 1e-2 lower the loss it is trained on, not its hard decisions.)"""
    from transformers import Trainer

    model = modify.convert(tiny_model("llama"), capacity=0.5, layers="every-other", causal="predictor")
    held_out = _sequences(8, seed=1)
    with torch.no_grad():
        loss_before = float(model(held_out).aux_loss)
    predictors = {n: p.detach().clone() for n, p in model.named_parameters() if "mod_predictor" in n}
    trainer = Trainer(model=model, args=_training_args(tmp_path / "run"), train_dataset=_Sequences(_sequences(16)))
    trainer.train()
    moved = [n for n, p in model.named_parameters() if n in predictors and not torch.equal(p, predictors[n])]
    assert sorted(moved) == sorted(predictors)
    with torch.no_grad():
        assert float(model.eval()(held_out).aux_loss) < loss_before - 0.05  # 0.68 -> 0.54 here
