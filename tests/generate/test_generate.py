"""generate() on converted models: exact at capacity 1.0, causal routing with a cache equal to recomputing the
prefix, left-padded batches equal to each prompt alone, skipped tokens that cost nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modify
from modify.api import routed_blocks
from modify.generate.cache import HISTORY_ATTR
from modify.testing import FAMILIES, tiny_model

GREEDY = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "pad_token_id": 0}


def routed_model(family: str, capacity: float = 0.5, layers: str | list[int] = "all", keep_first: int = 1,
                 attn: str = "eager", **kwargs) -> nn.Module:  # fmt: skip
    """A converted tiny model with random routers and thresholds fitted on random text: tokens decide unlike."""
    model = tiny_model(family, attn_implementation=attn)
    modify.convert(model, capacity, layers, keep_first=keep_first, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for block, _ in routed_blocks(model):
        block.mod_router.weight.data = torch.randn(block.mod_router.weight.shape, generator=gen) * 0.5
    modify.fit_thresholds(model, [torch.randint(3, 90, (4, 24), generator=gen)])
    return model


def left_padded(lengths: list[int]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    prompts = [torch.randint(3, 90, (1, n)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - p.shape[1] :] = p
        mask[i, width - p.shape[1] :] = 1
    return prompts, ids, mask


def processed_share(cache) -> float:  # type: ignore[no-untyped-def]
    history = getattr(cache, HISTORY_ATTR)
    return sum(h.valid.float().mean().item() for h in history.values()) / len(history)


# SDPA masks differ from eager ones (boolean, and none at all when the model can skip it)
CASES = [(f, "eager") for f in sorted(FAMILIES)] + [(f, "sdpa") for f in ("llama", "qwen2", "gpt2", "opt")]


@pytest.mark.parametrize(("family", "attn"), CASES)
def test_capacity_one_generates_the_original_tokens(family: str, attn: str) -> None:
    reference = tiny_model(family, attn_implementation=attn)
    model = tiny_model(family, attn_implementation=attn)
    modify.convert(model, capacity=1.0, layers="all")
    _, ids, mask = left_padded([7, 4])
    assert torch.equal(model.generate(ids[:1], **GREEDY), reference.generate(ids[:1], **GREEDY))
    expected = reference.generate(ids, attention_mask=mask, **GREEDY)
    assert torch.equal(model.generate(ids, attention_mask=mask, **GREEDY), expected)
    torch.manual_seed(3)
    sampled = reference.generate(ids[:1], do_sample=True, max_new_tokens=8, pad_token_id=0)
    torch.manual_seed(3)
    assert torch.equal(model.generate(ids[:1], do_sample=True, max_new_tokens=8, pad_token_id=0), sampled)


@pytest.mark.parametrize(("family", "attn"), CASES)
def test_cached_generation_equals_recomputing_the_prefix(family: str, attn: str) -> None:
    model = routed_model(family, attn=attn)
    _, ids, mask = left_padded([9, 6, 4])
    out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **GREEDY)
    # the routers really decide: some positions skip a block, some don't
    assert 0.15 < processed_share(out.past_key_values) < 0.75
    uncached = model.generate(ids, attention_mask=mask, use_cache=False, **GREEDY)
    assert torch.equal(out.sequences, uncached)


@pytest.mark.parametrize(("family", "attn"), [("llama", "eager"), ("gpt2", "eager"), ("gemma2", "eager"),
                                              ("opt", "eager"), ("llama", "sdpa")])  # fmt: skip
def test_left_padded_batch_equals_each_prompt_alone(family: str, attn: str) -> None:
    model = routed_model(family, attn=attn)
    prompts, ids, mask = left_padded([9, 5, 7, 3])
    batch = model.generate(ids, attention_mask=mask, **GREEDY)
    for i, prompt in enumerate(prompts):
        alone = model.generate(prompt, **GREEDY)
        assert torch.equal(batch[i, ids.shape[1] :], alone[0, prompt.shape[1] :]), i


def test_a_skipped_token_does_not_touch_the_block() -> None:
    model = routed_model("llama", layers=[1])
    block, state = routed_blocks(model)[0]
    calls: list[tuple[int, int]] = []
    block.self_attn.q_proj.register_forward_hook(lambda m, a, out: calls.append(tuple(a[0].shape[:2])))
    block.mlp.register_forward_hook(lambda m, a, out: calls.append(tuple(a[0].shape[:2])))
    state.threshold = 1e9  # only the always-processed first token goes through
    prompt = torch.randint(3, 90, (1, 6))
    out = model.generate(prompt, return_dict_in_generate=True, **GREEDY)
    assert calls == [(1, 1), (1, 1)]  # the prefill's first token; no decode step ran the block
    valid = getattr(out.past_key_values, HISTORY_ATTR)[state.cache_layer].valid
    assert valid.shape == (1, 6 + 9) and valid[0].tolist() == [True] + [False] * 14


def test_rows_that_skip_leave_the_call() -> None:
    model = routed_model("llama", layers=[1], keep_first=0)
    block, state = routed_blocks(model)[0]
    rows: list[int] = []
    block.mlp.register_forward_hook(lambda m, a, out: rows.append(a[0].shape[0]))
    # a threshold between the two rows' scores: one row's token runs the block, the other's skips it
    modify.set_routing(model, "causal")
    x = torch.randint(3, 90, (2, 1))
    scores = {}
    block.mod_router.register_forward_hook(lambda m, a, out: scores.setdefault("s", out.detach()))
    with torch.no_grad():
        model(x)
    state.threshold = float(scores["s"].mean())
    rows.clear()
    with torch.no_grad():
        model(x)
    above = int((scores["s"] > state.threshold).sum())
    assert above == 1 and rows == [1]


def test_routing_modes() -> None:
    model = routed_model("llama")
    ids = torch.randint(3, 90, (2, 16))
    assert modify.set_routing(model, "causal") == "auto"
    with torch.no_grad():
        causal = model(ids).logits
        with modify.routing_mode(model, "topk"):
            topk = model(ids).logits
        assert torch.equal(model(ids).logits, causal)
    modify.set_routing(model, "auto")  # outside generate(): top-k
    with torch.no_grad():
        assert torch.equal(model(ids).logits, topk)
    assert not torch.equal(causal, topk)
    with pytest.raises(ValueError, match="unknown routing mode"):
        modify.set_routing(model, "sometimes")


def test_causal_forward_equals_token_by_token_decoding() -> None:
    """Prefill and decode apply one rule: the logits of a full causal forward are those of feeding the
    tokens one at a time through the cache."""
    model = routed_model("llama")
    modify.set_routing(model, "causal")
    ids = torch.randint(3, 90, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache, steps = None, []
        for t in range(ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_topk_generation_and_a_cache_a_topk_forward_filled() -> None:
    model = routed_model("llama")
    ids = torch.randint(3, 90, (2, 8))
    with modify.routing_mode(model, "topk"):  # per-call top-k inside generate(): prefill k of 8, then 1 of 1
        out = model.generate(ids, return_dict_in_generate=True, **GREEDY)
        assert processed_share(out.past_key_values) == pytest.approx((4 + 9) / 17)  # the last token is not fed
        with torch.no_grad():
            first = model(ids, use_cache=True)  # outside generate(): the training forward, routed tokens only
        with pytest.raises(ValueError, match="filled by a top-k forward"), torch.no_grad():
            model(ids[:, :1], cache=first.past_key_values, use_cache=True)


def test_beam_search_is_refused_with_a_clear_error() -> None:
    model = routed_model("llama")
    with pytest.raises(ValueError, match="beam search"):
        model.generate(torch.randint(3, 90, (1, 5)), num_beams=2, max_new_tokens=3, pad_token_id=0)
    with modify.routing_disabled(model):  # dense: beams are fine
        model.generate(torch.randint(3, 90, (1, 5)), num_beams=2, max_new_tokens=3, pad_token_id=0)


@pytest.mark.parametrize(("attn", "kv"), [("eager", "routed"), ("sdpa", "routed"), ("sdpa", "all")])
def test_a_static_cache_generates_what_the_dynamic_one_does(attn: str, kv: str) -> None:
    """kv="routed" layers keep their hidden zeros in a static layer's unwritten positions; the mask is as wide as
    the cache, its keys the absolute positions; a left-padded batch reads its padding at those columns."""
    model = routed_model("llama", attn=attn, kv=kv)
    _, ids, mask = left_padded([9, 6, 4])
    for prompt, prompt_mask in ((ids[:1], None), (ids, mask)):
        for sample in (False, True):
            kwargs = {**GREEDY, "do_sample": sample, "top_k": 0, "output_logits": True, "return_dict_in_generate": True}
            torch.manual_seed(2)
            dynamic = model.generate(prompt, attention_mask=prompt_mask, **kwargs)
            torch.manual_seed(2)
            static = model.generate(prompt, attention_mask=prompt_mask, cache_implementation="static", **kwargs)
            assert type(static.past_key_values).__name__ == "StaticCache"
            assert torch.equal(static.sequences, dynamic.sequences)
            for a, b in zip(static.logits, dynamic.logits, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_cache_routing_cannot_follow_is_refused_with_a_clear_error() -> None:
    model = routed_model("mistral", layers=[1])  # a static sliding window: written round a ring
    with pytest.raises(ValueError, match="StaticSlidingWindowLayer, which causal routing isn't tested with"):
        model.generate(torch.randint(3, 90, (1, 5)), cache_implementation="static", **GREEDY)
    removed = routed_model("llama", capacity=0.0, layers=[1])  # a removed block's layer only counts positions
    with pytest.raises(ValueError, match="modify export"):
        removed.generate(torch.randint(3, 90, (1, 5)), cache_implementation="static", **GREEDY)
