"""The decode step's fast path (:mod:`modify.routing.decode`) against the general per-token path.

Both paths must give the same tokens and the same logits, greedy and sampled, at batch 1 and in a left-padded
batch, with ``kv="routed"`` and ``kv="all"``: bit for bit, but for ``kv="all"`` batches (below 1e-5: the paths'
matrix products run over different numbers of rows). The fast path must really serve the decode steps
(every row, some rows and no row processing), and cached generation must equal recomputing the prefix.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch import nn

import modify
import modify.routing.forward as routed_forward
from tests.generate.test_generate import left_padded, routed_model

NEW = {"max_new_tokens": 12, "min_new_tokens": 12, "pad_token_id": 0}
CASES = [("llama", "sdpa", "routed"), ("llama", "eager", "all"), ("llama", "sdpa", "all"), ("gpt2", "eager", "routed"),
         ("qwen2", "eager", "routed"), ("gemma2", "eager", "all")]  # fmt: skip


def _generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, sample: bool, **kwargs: Any) -> Any:
    torch.manual_seed(7)
    return model.generate(
        ids, attention_mask=mask, do_sample=sample, top_k=0, output_logits=True, return_dict_in_generate=True,
        **NEW, **kwargs,
    )  # fmt: skip


def _general(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routed_forward, "fast_decode", lambda *args: False)


@pytest.fixture
def rows_seen(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """How many decode steps of routed blocks took the fast path with every row, some rows and no row processing."""
    seen: Counter = Counter()
    step = routed_forward.decode_step

    def counted(block, state, call, scores, process, history):  # type: ignore[no-untyped-def]
        n, batch = int(process.sum()), process.shape[0]
        seen["all" if n == batch else "none" if n == 0 else "some"] += 1
        return step(block, state, call, scores, process, history)

    monkeypatch.setattr(routed_forward, "decode_step", counted)
    return seen


@pytest.mark.parametrize(("family", "attn", "kv"), CASES)
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_fast_path_equals_general_path(
    family: str, attn: str, kv: str, sample: bool, rows_seen: Counter, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = routed_model(family, attn=attn, kv=kv)
    prompts, ids, mask = left_padded([9, 4, 7, 6])
    fast = {"one": _generate(model, prompts[0], None, sample), "batch": _generate(model, ids, mask, sample)}
    assert rows_seen["all"] and rows_seen["none"] and rows_seen["some"], rows_seen  # every case ran
    _general(monkeypatch)
    rows_seen.clear()
    general = {"one": _generate(model, prompts[0], None, sample), "batch": _generate(model, ids, mask, sample)}
    assert not rows_seen
    for case in fast:
        assert torch.equal(fast[case].sequences, general[case].sequences), case
        worst = max(float((a - b).abs().max()) for a, b in zip(fast[case].logits, general[case].logits, strict=True))
        if case == "one" or kv == "routed":
            assert worst == 0.0, case
        else:
            # kv="all"'s general path runs every row's query in one batch, the fast path only the processed rows:
            # matrix products over another number of rows round differently in the last bits
            assert worst < 1e-5, case


@pytest.mark.parametrize(("family", "attn", "kv"), [("llama", "sdpa", "routed"), ("llama", "sdpa", "all"),
                                                   ("gemma2", "eager", "all")])  # fmt: skip
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("path", ["fast", "general"])
def test_cached_equals_uncached(
    family: str, attn: str, kv: str, sample: bool, path: str, rows_seen: Counter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma2's sliding window (8) is shorter than prompt and generation: its mask is narrower than the cache."""
    model = routed_model(family, attn=attn, kv=kv)
    if path == "general":
        _general(monkeypatch)
    _, ids, mask = left_padded([8, 5, 3])
    cached = _generate(model, ids, mask, sample)
    assert (sum(rows_seen.values()) > 0) == (path == "fast")
    uncached = _generate(model, ids, mask, sample, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv", ["all", "routed"])
def test_a_skipped_decode_step_writes_only_what_the_dense_model_would(kv: str) -> None:
    """kv="all": a token no row processes still writes its keys and values (the layer stays the dense model's);
    kv="routed": the layer grows by one hidden position."""
    model = routed_model("llama", layers=[1], attn="sdpa", kv=kv)
    ((block, state),) = modify.api.routed_blocks(model)
    prompt = torch.randint(3, 90, (1, 6))
    calls: list[int] = []
    with torch.no_grad(), modify.routing_mode(model, "causal"):
        out = model(prompt, use_cache=True)
        state.threshold = 1e9  # no decode token is processed
        handle = block.mlp.register_forward_hook(lambda m, a, o: calls.append(1))
        model(prompt[:, :1], past_key_values=out.past_key_values, use_cache=True)
        handle.remove()
    layer = out.past_key_values.layers[state.cache_layer]
    assert calls == [] and layer.keys.shape[-2] == 7
    assert bool(layer.keys[..., -1, :].abs().sum() > 0) == (kv == "all")


def test_a_started_threshold_is_not_recomputed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The quantile that starts an unfitted threshold is computed until the threshold holds a number, not in
    every decode step; setting a NaN threshold starts it again."""
    import modify.routing.rules as rules

    model = routed_model("llama", attn="sdpa")
    blocks = modify.api.routed_blocks(model)
    computed: list[int] = []
    quantile = rules.thresholds.quantile_of
    monkeypatch.setattr(rules.thresholds, "quantile_of", lambda *a: computed.append(1) or quantile(*a))
    prompt = torch.randint(3, 90, (1, 6))
    model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert len(computed) == len(blocks)  # each block's first call only: its fitted threshold is then known
    block, state = blocks[0]
    fitted = state.threshold
    state.threshold = float("nan")
    computed.clear()
    model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert len(computed) == 1 and state.threshold == state.threshold and state.threshold != fitted
