"""Packed sequences: several documents per row, position ids restarting at each (TRL's padding-free collator).

transformers builds a block-diagonal causal mask from such position ids. A routed block gathers that mask
and the positions with its tokens, so a routed token still attends only within its own document, at its own
position; capacity applies to the packed row as a whole (see docs/how-it-works.md).
"""

from __future__ import annotations

import pytest
import torch

import modify
from modify.api import routed_blocks
from modify.routing import capacity_tokens
from modify.testing import tiny_model
from tests.helpers import set_router_weights

DOCS = [[5, 7, 4], [9, 7]]  # document lengths per row: 16 tokens each
FAMILIES = ["llama", "qwen2", "gemma2"]
#: (family, attention implementation): eager everywhere, sdpa where transformers has it (not Gemma2).
CASES = [(f, "eager") for f in FAMILIES] + [("llama", "sdpa"), ("qwen2", "sdpa")]


def _packed() -> tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(3)
    rows, positions, docs = [], [], []
    for lengths in DOCS:
        row_docs = [torch.randint(3, 97, (n,), generator=gen) for n in lengths]
        docs.append(row_docs)
        rows.append(torch.cat(row_docs))
        positions.append(torch.cat([torch.arange(n) for n in lengths]))
    return torch.stack(rows), torch.stack(positions), docs


def _check_documents_alone(model: torch.nn.Module) -> None:
    ids, positions, docs = _packed()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        for r, row_docs in enumerate(docs):
            start = 0
            for doc in row_docs:
                alone = model(input_ids=doc[None], use_cache=False).logits[0]
                torch.testing.assert_close(packed[r, start : start + len(doc)], alone, atol=1e-5, rtol=0)
                start += len(doc)


@pytest.mark.parametrize("family,attention", CASES)
def test_packed_documents_match_each_document_alone_at_capacity_one(family: str, attention: str) -> None:
    model = tiny_model(family, attn_implementation=attention)
    _check_documents_alone(model)  # what transformers itself guarantees for the dense model
    modify.convert(model, capacity=1.0, layers="all")
    _check_documents_alone(model)


@pytest.mark.parametrize("family,attention", CASES)
def test_routed_tokens_attend_only_within_their_document(family: str, attention: str) -> None:
    """At capacity 0.5 the routed block's attention sees the gathered block-diagonal mask and the tokens'
    own restarted positions: no routed token attends to another document or to a later token."""
    model = modify.convert(tiny_model(family, attn_implementation=attention), capacity=0.5, layers="all")
    set_router_weights(model, std=10.0)
    block, state = routed_blocks(model)[1]
    picked: list[torch.Tensor] = []
    original = state.topk

    def topk(scores: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        picked.append(original(scores, padding))
        return picked[-1]

    state.topk = topk  # type: ignore[method-assign]
    seen: dict = {}
    attention = block.self_attn
    handle = attention.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    ids, positions, _ = _packed()
    with torch.no_grad():
        model(input_ids=ids, position_ids=positions, use_cache=False)
    handle.remove()
    idx = picked[0]
    k = capacity_tokens(0.5, ids.shape[1])
    assert idx.shape == (2, k)
    doc_of = torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)]) for lengths in DOCS])
    docs, pos = doc_of.gather(1, idx), positions.gather(1, idx)
    # Both documents of a row are routed somewhere, or the test would prove nothing.
    assert all(len(set(row.tolist())) > 1 for row in docs)
    allowed = modify.routing.mask_allows(seen["attention_mask"])[:, 0]  # [B, k, k]
    same_doc = docs[:, :, None] == docs[:, None, :]
    causal = idx[:, :, None] >= idx[:, None, :]
    if family != "gemma2":  # its sliding window (8) masks more; the rule below holds for every family
        assert torch.equal(allowed, same_doc & causal)
    assert not (allowed & ~(same_doc & causal)).any()
    cos = seen["position_embeddings"][0]
    dense_cos = model.model.rotary_emb(torch.zeros(1), positions)[0]
    torch.testing.assert_close(cos, dense_cos.gather(1, idx[..., None].expand(-1, -1, cos.shape[-1])))
    assert pos.min() == 0  # positions restart per document, kept as they are
