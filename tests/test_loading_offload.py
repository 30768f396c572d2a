"""Converting or loading a model whose first parameter accelerate offloaded (issue 30, item 7): the probe that
captures each block's call built its token ids on ``next(model.parameters()).device``, which is ``meta`` there,
and failed with "Cannot copy out of meta tensor". Each case must give the logits of the same model unplaced."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import modify
from modify.testing import tiny_model

IDS = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("offload", ["cpu_offload", "disk_offload"])
def test_convert_after_accelerate_offload(offload: str, tmp_path: Path) -> None:
    from accelerate import cpu_offload, disk_offload

    plain = modify.convert(tiny_model("llama"), capacity=0.5)
    placed = tiny_model("llama")
    if offload == "cpu_offload":
        cpu_offload(placed, execution_device="cpu")
    else:
        disk_offload(placed, str(tmp_path / "offload"), execution_device="cpu")
    assert next(placed.parameters()).is_meta
    modify.convert(placed, capacity=0.5)
    with torch.no_grad():
        torch.testing.assert_close(placed(IDS).logits, plain(IDS).logits, rtol=0, atol=0)


def test_load_with_the_embedding_offloaded(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    modify.convert(tiny_model("llama", attn_implementation="sdpa"), capacity=0.5).save_pretrained(tmp_path / "out")
    reference = modify.from_pretrained(tmp_path / "out")
    placed = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", device_map="auto", max_memory={"cpu": "20KB"}, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert placed.get_input_embeddings().weight.is_meta  # the whole model offloaded to disk at this budget
    with torch.no_grad():
        torch.testing.assert_close(placed(IDS).logits, reference(IDS).logits, rtol=0, atol=0)
