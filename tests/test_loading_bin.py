"""Converted checkpoints saved as ``pytorch_model.bin`` (older transformers, ``torch.save`` of a state dict, some
hub mirrors) load as the safetensors ones do (issue 30, item 4): the loader reads their keys, so a router's
saved threshold is loaded, not left as an uninitialised buffer that varied from run to run, and routers that
don't match the plan are refused before loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import modify
from modify.api import routed_blocks
from modify.errors import ModifyError
from modify.testing import tiny_model

IDS = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))


def _thresholds(model: torch.nn.Module) -> list[float]:
    return [float(block.mod_router.threshold) for block, _ in routed_blocks(model)]


def _saved_as_bin(tmp_path: Path, sharded: bool = False, damage: str = "") -> tuple[torch.nn.Module, Path]:
    """A converted tiny Llama whose thresholds moved past the plan's (as training moves them, and Trainer
    doesn't refresh the plan), saved with its weights in .bin files only."""
    model = modify.convert(tiny_model("llama"), capacity=0.5)
    modify.fit_thresholds(model, [torch.randint(3, 90, (4, 24), generator=torch.Generator().manual_seed(1))])
    with torch.no_grad():
        for block, _ in routed_blocks(model):
            block.mod_router.threshold.add_(0.25)
    out = tmp_path / "out"
    model.save_pretrained(out)
    state = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    if damage:  # block 3's router gone
        state = {k: v for k, v in state.items() if not k.startswith("model.layers.3.mod_router")}
    if sharded:
        import json

        names = sorted(state)
        halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
        for file, keys in halves.items():
            torch.save({k: state[k] for k in keys}, out / file)
        index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
        (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        torch.save(state, out / "pytorch_model.bin")
    return model, out


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("loader", ["modify", "auto"])
def test_bin_checkpoint_loads_its_saved_thresholds(loader: str, sharded: bool, tmp_path: Path) -> None:
    model, out = _saved_as_bin(tmp_path, sharded)
    if loader == "modify":  # the tiny model's attention (eager): sdpa's logits differ from it by ~1e-7
        loaded = modify.from_pretrained(out, attn_implementation="eager")
    else:
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert _thresholds(loaded) == _thresholds(model)
    with torch.no_grad(), modify.routing_mode(model, "causal"), modify.routing_mode(loaded, "causal"):
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    prompt = IDS[:1, :6]
    kwargs = {"max_new_tokens": 8, "do_sample": False}
    assert torch.equal(loaded.generate(prompt, **kwargs), model.generate(prompt, **kwargs))


def test_bin_checkpoint_without_a_router_is_refused(tmp_path: Path) -> None:
    _, out = _saved_as_bin(tmp_path, damage="router dropped")
    with pytest.raises(ModifyError) as info:
        modify.from_pretrained(out)
    assert "\n" not in str(info.value)
