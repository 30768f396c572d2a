"""The causal rules: thresholds from text and from training, the aux and predictor losses in outputs.loss, the
plan that records them, and their FLOPs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import modify
from modify.api import routed_blocks
from modify.config import MoDConfig
from modify.io.checkpoint import Source, save_converted
from modify.testing import tiny_model
from tests.generate.test_generate import GREEDY, routed_model


def test_fitted_thresholds_route_the_capacity_on_their_text() -> None:
    # blocks after a dense one: no two tokens share an input (after routed blocks only, skipped tokens' inputs
    # are their embeddings, and repeated tokens tie)
    model = routed_model("llama", capacity=0.25, layers=[1, 3])
    text = torch.randint(3, 90, (8, 32))
    thresholds = modify.fit_thresholds(model, [text[:4], {"input_ids": text[4:]}])
    assert thresholds == [s.threshold for _, s in routed_blocks(model)]
    assert model.config.mixture_of_depths["thresholds"] == thresholds
    stats = modify.measure_agreement(model, [text])
    for block in stats.values():
        # 31 decided tokens per row (the first is always processed): the share above the (1 - c) quantile
        assert block["causal_share"] == pytest.approx(0.25, abs=1 / (8 * 31))
        assert block["topk_share"] == pytest.approx((8 - 1) / 31, abs=1e-9)  # ceil(0.25 * 32) = 8, one forced
        assert 0.5 < block["agreement"] <= 1.0


@pytest.mark.parametrize("rule", ["aux", "predictor"])
def test_aux_losses_join_outputs_loss(rule: str) -> None:
    model = routed_model("llama", causal=rule)
    coef = model.config.mixture_of_depths["aux_loss_coef"]
    ids = torch.randint(3, 90, (2, 16))
    model.train()
    out = model(ids, labels=ids)
    assert out.aux_loss.ndim == 0 and out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + coef * out.aux_loss)
    # the aux loss is a BCE on top-k membership: recompute it for the first routed block
    block, state = routed_blocks(model)[0]
    assert len(state.aux_losses) == 0  # collected and cleared by the model's hook
    out.aux_loss.backward(retain_graph=True)
    if rule == "predictor":  # stop-gradient: only the predictors learn from it
        assert block.mod_predictor.fc2.weight.grad.abs().sum() > 0
        assert block.mod_router.weight.grad is None and block.mlp.up_proj.weight.grad is None
        model.zero_grad()
        out.lm_loss.backward()
        assert block.mod_predictor.fc2.weight.grad is None or block.mod_predictor.fc2.weight.grad.abs().sum() == 0
    else:
        assert block.mod_router.weight.grad.abs().sum() > 0


def test_predictor_starts_at_the_threshold_rule_and_learns_past_it() -> None:
    model = routed_model("llama", causal="predictor")
    text = torch.randint(3, 90, (8, 24))
    before = modify.measure_agreement(model, [text])
    for _, state in routed_blocks(model):
        state.causal = "threshold"
    assert modify.measure_agreement(model, [text]) == before  # a new predictor decides as the threshold rule
    for _, state in routed_blocks(model):
        state.causal = "predictor"
    params = [p for n, p in model.named_parameters() if "mod_predictor" in n]
    optimizer = torch.optim.Adam(params, lr=3e-2)
    model.train()
    for _ in range(60):
        out = model(text, labels=text)
        out.aux_loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    after = modify.measure_agreement(model, [text])
    assert sum(b["agreement"] for b in after.values()) > sum(b["agreement"] for b in before.values()) + 0.1


def test_training_moves_the_threshold_towards_the_batch_quantile() -> None:
    model = routed_model("llama", capacity=0.25)
    _, state = routed_blocks(model)[0]
    state.threshold = 5.0
    ids = torch.randint(3, 90, (2, 16))
    model.train()
    model(ids, labels=ids)
    assert state.threshold < 5.0
    moved = state.threshold
    model.eval()
    with torch.no_grad():
        model(ids)
    assert state.threshold == moved  # evaluation doesn't move it


def test_plan_records_the_rule_and_it_survives_saving(tmp_path: Path) -> None:
    model = routed_model("llama", causal="predictor")
    for _, state in routed_blocks(model):
        state.threshold = 0.25
    save_converted(model, None, tmp_path / "m", Source("directory", tmp_path))
    loaded = modify.from_pretrained(tmp_path / "m")
    plan = loaded.config.mixture_of_depths
    assert plan["causal"] == "predictor" and plan["thresholds"] == [0.25] * 4
    a, b = model.state_dict(), loaded.state_dict()
    assert any("mod_predictor" in k for k in b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(3, 90, (1, 5))
    assert torch.equal(model.generate(ids, **GREEDY), loaded.generate(ids, **GREEDY))
    modify.revert(loaded)
    assert not any("mod_" in k for k in loaded.state_dict()) and "generate" not in loaded.__dict__


def test_predictor_flops_are_counted() -> None:
    model = tiny_model("llama")
    modify.convert(model, 0.5, "all", causal="predictor")
    model.train()  # the top-k forward computes the predictors' loss
    ids = torch.randint(3, 90, (1, 16))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids)
    assert modify.flops(model, 16).routed == counter.get_total_flops()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"causal": "sometimes"}, "unknown causal routing rule"),
        ({"thresholds": [0.0]}, "thresholds for 2 routed blocks"),
        ({"thresholds": [0.0, float("nan")]}, "thresholds must be finite"),
        ({"aux_loss_coef": -1.0}, "aux_loss_coef"),
        ({"predictor_size": 0}, "predictor_size"),
    ],
)
def test_plan_rejects_bad_causal_settings(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MoDConfig(4, [1, 3], [0.5, 0.5], **change)
