"""Mixture-of-Depths-and-Experts on tiny Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE: staged (a router in front of
the block) and integrated (a no-op expert in the expert router), side by side."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import modify
from modify.api import noop_layers
from modify.cli import main
from modify.errors import UnsupportedModelError
from modify.testing import tiny_model
from modify.testing.matrix import build, eager_experts
from tests.helpers import open_gates

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask


def _logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _measured(model: torch.nn.Module, ids: torch.Tensor) -> int:
    with eager_experts(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False)
    return counter.get_total_flops()


@pytest.mark.parametrize("family", FAMILIES)
def test_share_zero_and_capacity_one_reproduce_the_model(family: str) -> None:
    ids, mask = _batch()
    model = build(family)
    dense = _logits(model, ids, mask)
    modify.convert(model, capacity=1.0, layers="all", mode="integrated")
    assert torch.equal(_logits(model, ids, mask), dense)  # every token dispatched, gate exactly 1
    assert {b.form for b in modify.find_blocks(model)} == {"moe-noop"}
    assert model.config.mixture_of_depths["mode"] == "integrated"
    modify.revert(model)
    assert torch.equal(_logits(model, ids, mask), dense)
    modify.convert(model, capacity=1.0, layers="all", mode="staged")
    torch.testing.assert_close(_logits(model, ids, mask), dense, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["staged", "integrated"])
def test_flops_drop_as_predicted(family: str, mode: str) -> None:
    ids, _ = _batch()
    model = build(family)
    dense = _measured(model, ids)
    modify.convert(model, capacity=0.25, layers="every-other", mode=mode)
    count = modify.flops(model, ids.shape[1], ids.shape[0])
    assert count.dense == dense
    assert count.routed == _measured(model, ids) < dense


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_router_and_load_balancing_stays_finite(family: str) -> None:
    ids, mask = _batch()
    for mode, router in (("staged", "mod_router"), ("integrated", "mod_noop")):
        model = build(family).train()
        modify.convert(model, capacity=0.5, layers="every-other", mode=mode)
        open_gates(model)  # staged: a fresh router's weights get gradient once its gate scale moves
        out = model(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True)
        assert torch.isfinite(out.aux_loss) and torch.isfinite(out.loss)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        ours = [g for n, g in grads.items() if router in n and not n.endswith("scale")]
        experts = [g for n, g in grads.items() if n.endswith("mlp.gate.weight")]
        assert ours and all(g is not None and g.abs().sum() > 0 for g in ours), mode
        assert experts and all(g is not None and g.abs().sum() > 0 for g in experts), mode


def test_padding_takes_the_no_op_first_and_the_share_is_the_plans() -> None:
    ids, mask = _batch()
    model = modify.convert(build("mixtral"), capacity=0.5, layers=[1], mode="integrated")
    moe, state = noop_layers(model)[0]
    seen = []
    handle = moe.experts.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    _logits(model, ids, mask)
    handle.remove()
    assert seen == [2 * 12]  # ceil(0.5 * 24) tokens of each row reach the experts
    # Row 0 has 20 real tokens, row 1 has 24; 12 of each dispatched, padding never among them.
    assert state.last_share == pytest.approx(1 - 24 / 44)


def test_integrated_needs_a_mixture_of_experts_layer() -> None:
    with pytest.raises(UnsupportedModelError, match="no Mixture-of-Experts layer"):
        modify.convert(tiny_model("llama"), capacity=0.5, layers=[1], mode="integrated")
    with pytest.raises(ValueError, match="unknown mode"):
        modify.convert(tiny_model("llama"), mode="fused")


@pytest.mark.parametrize("mode", ["staged", "integrated"])
def test_a_short_training_run_lowers_the_loss(mode: str) -> None:
    ids, mask = _batch()
    model = modify.convert(build("qwen3_moe"), capacity=0.5, layers="every-other", mode=mode).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_convert_cli_and_from_pretrained_round_trip(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    source = tmp_path / "olmoe"
    build("olmoe").save_pretrained(source)
    out = tmp_path / "mode"
    assert main(["convert", str(source), str(out), "--mode", "integrated", "--capacity", "0.5", "-q"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert loaded.config.mixture_of_depths["mode"] == "integrated" and len(noop_layers(loaded)) == 2
    reference = modify.convert(
        AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager").eval(),
        capacity=0.5,
        mode="integrated",
    )
    ids, mask = _batch()
    assert torch.equal(_logits(loaded, ids, mask), _logits(reference, ids, mask))
    assert main(["inspect", str(out), "--json", "-q"]) == 0


def test_generate_runs_with_a_no_op_expert() -> None:
    """Prefill routes by the share; each decoded token (k = ceil(c·1) = 1) reaches the experts. At capacity 1.0
    greedy generation gives the original's tokens."""
    ids, _ = _batch()
    model = build("qwen2_moe")
    dense = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
    modify.convert(model, capacity=1.0, mode="integrated")
    assert torch.equal(model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False), dense)
    modify.revert(model)
    modify.convert(model, capacity=0.5, mode="integrated")
    assert model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False).shape == (1, 14)


@pytest.mark.parametrize("mode", ["staged", "integrated"])
def test_modify_train_trains_either_variant(tmp_path, mode: str) -> None:
    from modify.testing import tiny_tokenizer
    from modify.train.report import read_metrics

    source = tmp_path / "src"
    build("mixtral").save_pretrained(source)
    tokenizer = tiny_tokenizer(250)
    tokenizer.add_special_tokens({"eos_token": "<eos>"})
    tokenizer.save_pretrained(source)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(32):  # the eval split is drawn per document: enough that it is never empty
        (data / f"doc{i}.txt").write_text(("the quick brown fox jumps over the lazy dog " * 12) + str(i))
    converted = tmp_path / "converted"
    assert main(["convert", str(source), str(converted), "--mode", mode, "--capacity", "0.5", "-q"]) == 0
    out = tmp_path / "out"
    argv = ["train", str(converted), "--data", str(data), "--out", str(out), "--steps", "12", "--seq-len", "32"]
    argv += ["--batch-size", "4", "--eval-fraction", "0.25", "--eval-tokens", "64", "--autocast", "none", "-q"]
    assert main([*argv, "--lr", "3e-3"]) == 0
    losses = [r["loss"] for r in read_metrics(out / "metrics.csv")]
    assert losses[-1] < losses[0]
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out)
    assert trained.config.mixture_of_depths["mode"] == mode


def test_load_balancing_with_every_moe_layer_staged_says_what_to_do() -> None:
    ids, mask = _batch()
    model = modify.convert(build("mixtral"), capacity=0.5, layers="all").train()
    with pytest.raises(ValueError, match="output_router_logits=False"):
        model(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True)
    assert torch.isfinite(model(input_ids=ids, attention_mask=mask, labels=ids).loss)


def test_sampling_decides_token_by_token_against_a_threshold_kept_with_the_weights(tmp_path) -> None:
    """Inside generate() each decoded token goes to the experts only if its no-op margin is below the layer's
    threshold: the share-c quantile of the margins, set by the first batch and saved with the weights."""
    from transformers import AutoModelForCausalLM

    from modify.io.checkpoint import Source, save_converted

    ids, _ = _batch()
    model = modify.convert(build("olmoe"), capacity=0.5, layers="all", mode="integrated")
    (moe, state), *_ = noop_layers(model)
    assert moe.mod_noop.threshold.isnan()
    _logits(model, ids)  # sets the thresholds
    threshold = moe.mod_noop.threshold.item()
    assert state.last_share == pytest.approx(0.5)
    calls: list[int] = []
    handle = moe.experts.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    prompts = torch.randint(3, 250, (4, 6), generator=torch.Generator().manual_seed(9))
    model.generate(prompts, max_new_tokens=10, do_sample=False)
    handle.remove()
    decoded = sum(calls[1:])  # after the prefill, one decision per sequence and step (9 steps of 4 tokens)
    assert 0 < decoded < 36
    assert moe.mod_noop.threshold.item() == threshold  # sampling doesn't move it
    save_converted(model, None, tmp_path / "out", Source("test", tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert [m.mod_noop.threshold.item() for m, _ in noop_layers(loaded)] == [
        m.mod_noop.threshold.item() for m, _ in noop_layers(model)
    ]
