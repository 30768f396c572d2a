"""A routed block's state: one mode switch, hooks that attach and detach from outside, one running threshold."""

from __future__ import annotations

import math

import pytest
import torch

import modify
from modify.api import noop_layers, routed_blocks
from modify.moe.noop import NOOP_ATTR
from modify.routing import thresholds
from modify.testing import tiny_model
from modify.testing.matrix import build


def _ids(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))


def _model(**kwargs):  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    return modify.convert(model, capacity=0.5, layers="all", **kwargs)


def test_one_switch_routing_disabled_and_the_routing_mode_nest() -> None:
    model = _model()
    states = [s for _, s in routed_blocks(model)]
    with modify.routing_disabled(model):
        assert {s.mode for s in states} == {"dense"} and not any(s.enabled for s in states)
        # Chosen while disabled: applies once the blocks route again, not now.
        assert modify.set_routing(model, "causal") == "auto"
        assert {s.mode for s in states} == {"dense"}
        with modify.routing_disabled(model):
            pass
        assert {s.mode for s in states} == {"dense"}
    assert {s.mode for s in states} == {"causal"}
    with modify.routing_mode(model, "topk"), modify.routing_disabled(model):
        assert {s.mode for s in states} == {"dense"}
    assert {s.mode for s in states} == {"causal"}


def test_generating_is_the_models_fact_shared_by_its_blocks() -> None:
    model = _model()
    generations = {id(s.generation) for _, s in routed_blocks(model)}
    assert len(generations) == 1
    seen = []
    state = routed_blocks(model)[-1][1]
    state.hooks.add_topk(lambda *args: seen.append(state.generating))
    with torch.no_grad():
        model(_ids(model))  # top-k outside generate()
        modify.set_routing(model, "topk")
        model.generate(_ids(model)[:1, :4], max_new_tokens=2, do_sample=False)
    assert seen[0] is False
    assert not state.generating  # off again after generate()


def test_hooks_attach_from_outside_and_detach_by_handle() -> None:
    model = _model()
    state = routed_blocks(model)[0][1]
    calls: list[str] = []
    first = state.hooks.add_selection(lambda s, idx, g: calls.append("a"))
    state.hooks.add_selection(lambda s, idx, g: calls.append("b"))
    state.observer = lambda s, idx, g: calls.append("observer")
    with torch.no_grad():
        model(_ids(model))
    assert calls == ["a", "b", "observer"]
    first.remove()
    state.observer = None
    calls.clear()
    with torch.no_grad():
        model(_ids(model))
    assert calls == ["b"]


def test_the_running_threshold_starts_at_the_first_quantile_then_follows_by_one_momentum() -> None:
    threshold = torch.full((), math.nan)
    thresholds.follow(threshold, torch.tensor(2.0))
    assert threshold.item() == 2.0
    thresholds.follow(threshold, torch.tensor(4.0))
    assert threshold.item() == pytest.approx(2.0 + thresholds.MOMENTUM * 2.0)
    before = threshold.clone()
    thresholds.follow(threshold, torch.tensor(math.nan))  # no token decided: no quantile
    thresholds.start(threshold, torch.tensor(-1.0))  # fitted: start leaves it
    assert torch.equal(threshold, before)
    decided = torch.tensor([[True, False, True]])
    values = torch.tensor([[1.0, 100.0, 3.0]])
    assert thresholds.quantile_of(values, decided, 0.5).item() == 2.0


def test_the_noop_expert_and_the_router_follow_the_same_rule() -> None:
    """Two training batches: each threshold is the first batch's quantile moved by MOMENTUM towards the second's."""
    moe = modify.convert(build("mixtral"), capacity=0.5, layers="all", mode="integrated")
    staged = _model(causal="threshold")
    buffers = {
        "noop": [getattr(m, NOOP_ATTR).threshold for m, _ in noop_layers(moe)],
        "router": [s.router.threshold for _, s in routed_blocks(staged)],
    }
    for model, kind in ((moe, "noop"), (staged, "router")):
        model.train()  # the router's threshold follows in a training forward with gradients on
        first, second = _ids(model, 1), _ids(model, 2)
        model(second)
        alone = [float(t) for t in buffers[kind]]  # the second batch's quantile, from an unfitted start
        for t in buffers[kind]:
            t.fill_(math.nan)
        model(first)
        started = [float(t) for t in buffers[kind]]
        model(second)
        for t, start, target in zip(buffers[kind], started, alone):
            assert not math.isnan(start)
            assert float(t) == pytest.approx(start + thresholds.MOMENTUM * (target - start), rel=1e-5, abs=1e-6)
