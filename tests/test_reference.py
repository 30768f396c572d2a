"""The independent reference for routed blocks at capacity < 1 (modify/testing/reference.py): it passes the
routed forward, and it catches the routing bugs it exists for when they are injected into the routed call."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch

import modify
import modify.routing.call as routed_call
from modify.errors import UnsupportedModelError
from modify.testing import reference
from modify.testing.matrix import build
from modify.testing.reference import check_reference
from modify.testing.tiny_models import tiny_model

FAMILIES = ["llama", "qwen2", "gemma2", "gpt2", "bloom", "phi", "qwen3_next"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_routed_forward_matches_the_reference(family: str) -> None:
    assert check_reference(build(family)) <= 1e-5


def test_mpt_is_refused_and_fails_the_reference_by_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """MPT's blocks take ALiBi biases out of a table over max_seq_len: convert refuses such a table (no hand-made
    entry), and with that refusal off its routed blocks differ from the reference (biases of other positions)."""
    model = build("mpt")
    with pytest.raises(UnsupportedModelError, match="a table over the model's maximum number of positions"):
        modify.convert(model)
    probing = importlib.import_module("modify.passes.probe_block_calls")  # the package exports a function of that name
    monkeypatch.setattr(probing, "_position_limits", lambda model: set())
    with pytest.raises(AssertionError, match="differs from the reference"):
        check_reference(model)


def _positions_renumbered(original: Any) -> Any:
    def gather(value: Any, path: Any, spec: Any, idx: torch.Tensor, length: int) -> Any:
        first = torch.arange(idx.shape[1]).expand_as(idx)  # positions 0..k-1 instead of the selected ones
        return original(value, path, spec, first, length)

    return gather


def _mask_on_one_axis(original: Any) -> Any:
    def gather(value: Any, path: Any, spec: Any, idx: torch.Tensor, length: int) -> Any:
        if path == spec.pairwise and torch.is_tensor(value) and value.dim() == 4:
            rows = torch.arange(idx.shape[0])[:, None]
            queries = value.expand(idx.shape[0], *value.shape[1:])[rows, :, idx].transpose(1, 2)
            return queries[..., : idx.shape[1]]  # the key axis left as the first k columns
        return original(value, path, spec, idx, length)

    return gather


BROKEN_GATHERS = [
    ("llama", _positions_renumbered),
    ("llama", _mask_on_one_axis),
    ("qwen2", _positions_renumbered),
    ("gemma2", _mask_on_one_axis),
]


@pytest.mark.parametrize(("family", "inject"), BROKEN_GATHERS)
def test_the_reference_catches_a_broken_gather(monkeypatch: pytest.MonkeyPatch, family: str, inject: Any) -> None:
    model = build(family)
    monkeypatch.setattr(routed_call, "gather_value", inject(routed_call.gather_value))
    with pytest.raises(AssertionError, match="differs from the reference"):
        check_reference(model)


@pytest.mark.parametrize(("family", "attn"), [("qwen3_next", "eager"), ("llama", "sdpa")])
def test_the_reference_catches_an_unsorted_index(monkeypatch: pytest.MonkeyPatch, family: str, attn: str) -> None:
    """Top-k's tokens in descending order: order-dependent layers (a causal convolution, sdpa's causal flag with
    no mask) then see them backwards."""
    model = build(family) if attn == "eager" else tiny_model(family, attn_implementation=attn)
    original = routed_call.routed_call

    def backwards(x: Any, idx: torch.Tensor, gate: torch.Tensor, run: Any, base: Any = None) -> Any:
        return original(x, idx.flip(-1), gate.flip(-1), run, base)

    monkeypatch.setattr(routed_call, "routed_call", backwards)
    with pytest.raises(AssertionError, match="differs from the reference"):
        check_reference(model)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_a_sliding_window_counts_original_positions(monkeypatch: pytest.MonkeyPatch, family: str) -> None:
    """With the window cut to a few positions it bites within the check's 16 tokens: the routed blocks equal
    the reference whose masks keep the original positions, and not one whose window counts the k indices."""
    assert check_reference(build(family)) <= 1e-5
    monkeypatch.setattr(reference, "_masks_at_selected", lambda sub, full, idx: None)
    with pytest.raises(AssertionError, match="differs from the reference"):
        check_reference(build(family))
