"""``importance="grad"``: each token's importance is the first-order loss increase if the block skipped it."""

from __future__ import annotations

import pytest
import torch

import modify
from modify.calibrate.calibration import CalibrationSettings, calibrate
from modify.calibrate.dense_pass import dense_pass
from modify.passes.find_block_stack import find_block_stack
from modify.testing import tiny_model


def test_grad_importance_is_minus_gradient_dot_delta() -> None:
    torch.manual_seed(0)
    model = modify.convert(tiny_model("llama"), capacity=1.0, layers="all").eval()
    _, stack = find_block_stack(model)
    blocks = list(stack)
    windows = torch.randint(3, 90, (4, 12))
    dense = dense_pass(model, blocks, windows, [[0, 1]], [[2, 3]], 32, lambda *a: None, importance_kind="grad")
    # the same quantity by hand: block outputs kept in the graph, one backward of the summed loss
    ids = windows[:2]
    outputs: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        inputs.append(kwargs.get("hidden_states", args[0] if args else None))
        outputs.append(out[0] if isinstance(out, tuple) else out)

    hooks = [b.register_forward_hook(keep, with_kwargs=True) for b in blocks]
    embed = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))
    model.requires_grad_(False)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    for y in outputs:
        y.retain_grad()
    for h in [*hooks, embed]:
        h.remove()
    (loss * ids[:, 1:].numel()).backward()
    for i, (x, y) in enumerate(zip(inputs, outputs)):
        expected = torch.asinh(-(y.grad * (y - x)).sum(-1)).detach()
        assert torch.allclose(dense.importance[i][0], expected, atol=1e-5), i
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind", ["norm", "grad"])
def test_calibration_with_either_importance_plans_and_fits(kind: str) -> None:
    torch.manual_seed(0)
    windows = torch.randint(3, 90, (16, 32))
    settings = CalibrationSettings(tokens=512, seq_len=32, budget=0.7, sensitivity_tokens=128, importance=kind,
                                   dtype="float32")  # fmt: skip
    result = calibrate(tiny_model("llama"), windows, {}, settings)
    assert result.routed and result.routers and all(0 <= o <= 1 for o in result.to_dict()["router_overlap"].values())


def test_unknown_importance_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown importance 'abs'"):
        CalibrationSettings(importance="abs")
