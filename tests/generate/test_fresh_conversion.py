"""A fresh conversion (no calibration, no training) samples and trains from a sensible start.

Before, routers started at zero: in ``generate()`` no score passed the default threshold of 0, so each routed
block ran on the prompt's first token only, and top-k took each sequence's first k tokens (a positional rule).
"""

from __future__ import annotations

import math

import torch

import modify
from modify.api import routed_blocks
from modify.testing import tiny_model

PROMPT, NEW = 8, 8


def _count_rows(model: torch.nn.Module) -> tuple[dict[int, int], list]:
    """Per routed block, how many token rows its MLP processes (hooks; removed by the caller)."""
    counts: dict[int, int] = {}
    handles = []
    for block, state in routed_blocks(model):
        counts[state.index] = 0

        def count(module, args, index=state.index):  # type: ignore[no-untyped-def]
            counts[index] += args[0].shape[0] * args[0].shape[1]

        handles.append(block.mlp.register_forward_pre_hook(count))
    return counts, handles


def test_generate_routes_about_the_capacity_share() -> None:
    model = modify.convert(tiny_model("llama", attn_implementation="sdpa"), capacity=0.5)
    assert all(math.isnan(state.threshold) for _, state in routed_blocks(model))
    prompt = torch.randint(3, 97, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    counts, handles = _count_rows(model)
    model.generate(prompt, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)
    for h in handles:
        h.remove()
    # The prompt sets each threshold to the median of its scores: 4 of its 8 tokens, then about half the new.
    for index, rows in counts.items():
        assert 0.25 * (PROMPT + NEW) <= rows <= 0.75 * (PROMPT + NEW), (index, rows)
    assert not any(math.isnan(state.threshold) for _, state in routed_blocks(model))


def test_fresh_topk_is_not_positional() -> None:
    model = modify.convert(tiny_model("llama"), capacity=0.25)
    chosen = []
    for _, state in routed_blocks(model):
        state.observer = lambda scores, idx, gate: chosen.append(idx)
    model(torch.randint(3, 97, (4, 16), generator=torch.Generator().manual_seed(2)))
    first_k = torch.arange(4).expand(4, 4)
    assert len(chosen) == 2 and not any(torch.equal(idx, first_k) for idx in chosen)
    assert all(len({tuple(row.tolist()) for row in idx}) > 1 for idx in chosen)  # each row chooses its own


def test_fresh_conversion_at_capacity_one_is_bit_exact() -> None:
    model = tiny_model("llama")
    ids = torch.randint(3, 97, (2, 12))
    dense = model(ids).logits
    modify.convert(model, capacity=1.0, layers="all")
    assert torch.equal(model(ids).logits, dense)
    assert all(bool((block.mod_router.weight != 0).any()) for block, _ in routed_blocks(model))


def test_threshold_set_from_text_is_saved(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = modify.convert(tiny_model("llama"), capacity=0.5)
    assert model.config.mixture_of_depths["thresholds"] == [None, None]
    model.generate(torch.randint(3, 97, (1, 6)), max_new_tokens=2, do_sample=False)  # the prompt sets them
    thresholds = [state.threshold for _, state in routed_blocks(model)]
    assert not any(math.isnan(t) for t in thresholds)
    model.save_pretrained(tmp_path)
    loaded = modify.from_pretrained(tmp_path)
    assert [state.threshold for _, state in routed_blocks(loaded)] == thresholds


def test_an_old_plan_with_zero_thresholds_reads_as_unfitted() -> None:
    """Releases before unfitted thresholds existed wrote 0.0 for "never fitted" (no score passed it)."""
    from modify.config import MoDConfig

    old = {"num_blocks": 4, "routed": [1, 3], "capacities": [0.5, 0.5], "thresholds": [0.0, 0.0]}
    assert MoDConfig.from_dict(old).thresholds == [None, None]
    assert MoDConfig.from_dict({**old, "thresholds": [0.0, 0.25]}).thresholds == [0.0, 0.25]  # a fitted plan
    assert MoDConfig.from_dict({**old, "causal": "aux"}).thresholds == [0.0, 0.0]  # aux decides at 0 anyway
