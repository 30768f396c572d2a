"""Generation modes that edit the cache between calls: prompt lookup and assisted generation verify several
candidate tokens in one call, then ``crop`` the cache back to the accepted ones. The routing history kept
beside the cache (which cached positions hold real keys) must follow, or the next call's masks shift and the
tokens differ from greedy decoding's (issue 30, item 2)."""

from __future__ import annotations

import pytest
import torch

import modify
from modify.generate.cache import HISTORY_ATTR
from modify.testing import tiny_model
from tests.generate.test_generate import routed_model

GREEDY = {"max_new_tokens": 30, "min_new_tokens": 30, "do_sample": False, "pad_token_id": 0}


def _repetitive_prompt(seed: int = 0) -> torch.Tensor:
    # Prompt lookup proposes continuations of n-grams already in the prompt: a repeated pattern gives it some.
    pattern = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(seed))
    return pattern.repeat(1, 4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral", "gemma2"])
def test_prompt_lookup_gives_the_greedy_tokens(family: str) -> None:
    model = routed_model(family)
    prompt = _repetitive_prompt()
    greedy = model.generate(prompt, **GREEDY)
    looked_up = model.generate(prompt, prompt_lookup_num_tokens=3, **GREEDY)
    assert torch.equal(looked_up, greedy)


@pytest.mark.parametrize("assistant", ["dense", "routed"])
def test_assisted_generation_gives_the_greedy_tokens(assistant: str) -> None:
    model = routed_model("llama")
    helper = tiny_model("llama", seed=1) if assistant == "dense" else routed_model("llama", capacity=0.25)
    prompt = _repetitive_prompt(1)
    greedy = model.generate(prompt, **GREEDY)
    assisted = model.generate(prompt, assistant_model=helper, **GREEDY)
    assert torch.equal(assisted, greedy)


def test_the_history_follows_a_crop() -> None:
    model = routed_model("llama")
    prompt = _repetitive_prompt()
    with torch.no_grad(), modify.routing_mode(model, "causal"):
        cache = model(prompt, use_cache=True).past_key_values
        model(torch.tensor([[5, 6, 7]]), cache=cache, use_cache=True)
    assert all(h.valid.shape[1] == prompt.shape[1] + 3 for h in getattr(cache, HISTORY_ATTR).values())
    kept = [h.valid[:, : prompt.shape[1] + 1].clone() for h in getattr(cache, HISTORY_ATTR).values()]
    cache.crop(-2)  # the last two positions: rejected candidates
    with torch.no_grad(), modify.routing_mode(model, "causal"):
        model(torch.tensor([[8]]), cache=cache, use_cache=True)
    for h, before in zip(getattr(cache, HISTORY_ATTR).values(), kept, strict=True):
        assert h.valid.shape[1] == prompt.shape[1] + 2
        assert torch.equal(h.valid[:, :-1], before)
        assert int(h.real[0]) == prompt.shape[1] + 2
