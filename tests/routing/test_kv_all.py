"""``kv="all"``: skipped tokens keep their keys and values, routed tokens attend to every token.

Checked against the dense block (capacity 1.0, bit for bit), an independent reference built from the family's
own block (capacity 0.5, every family of the tiny set), ``kv="routed"`` on the same plan (they must differ),
and itself in every generation mode (cached against uncached, a left-padded batch against each row alone,
prompt lookup and a static cache against plain greedy, sampling cached against uncached).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import modify
from modify.api import routed_blocks
from modify.config import MoDConfig
from modify.errors import UnsupportedModelError
from modify.passes import find_block_stack
from modify.passes.split_attention import SPLIT_INPUTS
from modify.testing import tiny_model
from modify.testing.reference import TOLERANCE, check_kv_all_reference
from modify.testing.tiny_models import FAMILIES
from tests.helpers import ToyModel, set_router_weights

IDS = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(5))
MASK = torch.ones_like(IDS)
MASK[0, :3] = 0


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2"])
def test_capacity_one_is_bit_exact(family: str) -> None:
    model = tiny_model(family)
    with torch.no_grad():
        dense = model(IDS, attention_mask=MASK).logits
    modify.convert(model, capacity=1.0, layers="all", kv="all")
    set_router_weights(model)  # gates follow the scores: only capacity 1.0's routing, not gate 1, keeps it exact
    with torch.no_grad():
        routed = model(IDS, attention_mask=MASK).logits
    for _, state in routed_blocks(model):
        state.router.scale.data.zero_()
    with torch.no_grad():
        exact = model(IDS, attention_mask=MASK).logits
    real = MASK.bool()
    assert not torch.equal(routed[real], dense[real])  # the gates are applied
    assert torch.equal(exact[real], dense[real])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_matches_the_family_block_on_every_token(family: str) -> None:
    """Each block alone at capacity 0.5: Δ of the family's own block run on all tokens, gated, kept at the top-k."""
    attn = "eager" if family == "gemma2" else "sdpa"
    assert check_kv_all_reference(tiny_model(family, attn_implementation=attn)) <= TOLERANCE


def test_differs_from_subsequence_attention_and_from_dense() -> None:
    outs = {}
    for kv in ("routed", "all"):
        model = modify.convert(tiny_model("llama"), capacity=0.5, layers="all", kv=kv)
        with torch.no_grad():
            outs[kv] = model(IDS).logits
    with torch.no_grad():
        dense = tiny_model("llama")(IDS).logits
    assert (outs["all"] - outs["routed"]).abs().max() > 1e-3
    # Keys and values of every token: closer to the dense model than subsequence attention at equal capacity
    assert (outs["all"] - dense).abs().mean() < (outs["routed"] - dense).abs().mean()


def test_the_split_graphs() -> None:
    """The key/value side holds no query, output projection or MLP; the query side no key/value projection and
    no cache write; both are valid graphs."""
    model = modify.convert(tiny_model("llama", attn_implementation="sdpa"), capacity=0.5, layers=[1], kv="all")
    ((_, state),) = routed_blocks(model)
    assert state.program.attention == ("self_attn",)
    assert state.program.splits  # captured at conversion, before the first call
    for split in state.program.splits.values():
        kv_targets = {str(n.target) for n in split.kv.graph.nodes if n.op == "call_module"}
        q_targets = {str(n.target) for n in split.query.graph.nodes if n.op == "call_module"}
        assert {"block.self_attn.k_proj", "block.self_attn.v_proj", "block.input_layernorm"} <= kv_targets
        assert not kv_targets & {"block.self_attn.q_proj", "block.self_attn.o_proj", "block.mlp"}
        assert {"block.self_attn.q_proj", "block.self_attn.o_proj", "block.mlp"} <= q_targets
        assert not q_targets & {"block.self_attn.k_proj", "block.self_attn.v_proj"}
        assert not any(n.op == "call_method" and n.target == "update" for n in split.query.graph.nodes)
        names = [n.name for n in split.query.graph.nodes if n.op == "placeholder"]
        assert tuple(names[-3:]) == SPLIT_INPUTS
        split.kv.graph.lint()
        split.query.graph.lint()


def _generate(model: torch.nn.Module, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=10, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generation_modes_agree(attn: str) -> None:
    model = modify.convert(tiny_model("llama", attn_implementation=attn), capacity=0.5, layers="all", kv="all")
    set_router_weights(model)
    prompt = IDS[1:, :10]
    greedy = _generate(model, prompt, do_sample=False)
    assert torch.equal(greedy, _generate(model, prompt, do_sample=False, use_cache=False))
    assert torch.equal(greedy, _generate(model, prompt, do_sample=False, prompt_lookup_num_tokens=3))
    assert torch.equal(greedy, _generate(model, prompt, do_sample=False, cache_implementation="static"))
    torch.manual_seed(3)
    sampled = _generate(model, prompt, do_sample=True, top_k=0)
    torch.manual_seed(3)
    assert torch.equal(sampled, _generate(model, prompt, do_sample=True, top_k=0, use_cache=False))
    # a left-padded batch gives each row what it gets alone
    batch, mask = IDS[:, :10].clone(), MASK[:, :10]
    batch[0, :3] = 0
    together = _generate(model, batch, attention_mask=mask, do_sample=False)
    alone = _generate(model, batch[:1, 3:], do_sample=False)
    assert torch.equal(together[0, 10:], alone[0, 7:])
    assert torch.equal(together[1, 10:], greedy[0, 10:])


def test_a_processed_token_routes_each_step() -> None:
    """In decoding, the causal rule decides per token: some steps run the query side, some only keys/values."""
    model = modify.convert(tiny_model("llama"), capacity=0.5, layers=[1], kv="all")
    set_router_weights(model)
    ((_, state),) = routed_blocks(model)
    calls = []
    original = state.program.splits
    for split in original.values():
        split.query.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[1]))
    _generate(model, IDS[1:, :10], do_sample=False)
    assert calls and 0 < len(calls) < 11  # the prompt's call, then only the decode steps that processed


def test_checkpoint_keeps_the_option(tmp_path: Path) -> None:
    model = modify.convert(
        tiny_model("llama", attn_implementation="sdpa"), capacity=0.5, layers=[1, 2], kv=["all", "routed"]
    )
    set_router_weights(model)
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["mixture_of_depths"]
    assert saved["kv"] == ["all", "routed"] and saved["version"] == 2
    loaded = modify.from_pretrained(tmp_path / "out").eval()
    assert [s.kv for _, s in routed_blocks(loaded)] == ["all", "routed"]
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_a_version_one_plan_loads_as_routed() -> None:
    plan = MoDConfig.from_dict({"num_blocks": 4, "routed": [1], "capacities": [0.5], "version": 1})
    assert plan.kv == ["routed"]


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown kv option 'some'; choose one of"):
        MoDConfig(4, [1], [0.5], kv=["some"])
    model = ToyModel("pre-norm").eval()  # its "attention" is a linear map: no attention call to split
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match="kv='all' needs its attention split") as info:
        modify.convert(
            model, capacity=0.5, layers="all", kv="all", example_inputs=lambda t: {"x": torch.randn(2, t, 8)}
        )
    assert "\n" not in str(info.value) and "use kv='routed'" in str(info.value)
    assert not routed_blocks(model)  # nothing changed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    _, stack = find_block_stack(model)
    assert len(stack) == 3


def test_a_split_that_does_not_reproduce_the_block_is_refused() -> None:
    """Multi-head latent attention (YoutuLLM) splits, but its query side doesn't give the block's own outputs:
    conversion checks the split on a probe call and refuses it in one line, changing nothing."""
    from modify.testing.matrix import build

    model = build("youtu")
    with pytest.raises(UnsupportedModelError, match="split gives other outputs than the block") as info:
        modify.convert(model, capacity=0.5, layers="all", kv="all")
    assert "\n" not in str(info.value) and not routed_blocks(model)
    modify.convert(model, capacity=0.5, layers="all")  # kv="routed" still converts
