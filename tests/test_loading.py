"""The paths a Hugging Face user takes first: save and reload through transformers' own ``save_pretrained``
(a Trainer checkpoint's too), loading with ``device_map`` and disk offload, converting a placed model, a
conversion that fails late, and the attention implementations routing refuses.

Each test here failed on the release before these paths were built (routers dropped after a plain save,
"Tensor on device cpu is not on the expected device meta" under offload, a half-converted model after a
late failure, flash attention neither tested nor refused).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import modify
from modify.api import routed_blocks
from modify.errors import ModifyError, UnsupportedModelError
from modify.routing import STATE_ATTR
from modify.testing import tiny_model

IDS = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
#: Blocks 1 and 3 (the routed ones) offloaded to disk, the rest on the CPU.
OFFLOAD_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.layers.3": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


def _converted(capacity: float = 0.5) -> nn.Module:
    model = modify.convert(tiny_model("llama", attn_implementation="sdpa"), capacity=capacity)
    with torch.no_grad():  # trained-looking routers and gates: a reload that drops them shows
        for block, _ in routed_blocks(model):
            block.mod_router.weight.normal_()
            block.mod_router.scale.fill_(0.5)
    return model


def _routers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "mod_router" in k}


def _same_routers(a: nn.Module, b: nn.Module) -> None:
    """Weights, gate scales and thresholds equal (an unfitted threshold is NaN in both)."""
    ra, rb = _routers(a), _routers(b)
    assert ra.keys() == rb.keys() and any(k.endswith("threshold") for k in ra)
    for k in ra:
        torch.testing.assert_close(ra[k], rb[k], rtol=0, atol=0, equal_nan=True, msg=k)


def _load_auto(path: Path, **kwargs: object) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


@pytest.mark.parametrize("loader", ["modify", "auto"])
def test_plain_save_pretrained_reloads_routed(loader: str, tmp_path: Path) -> None:
    """``model.save_pretrained`` of a converted model (what Trainer and push_to_hub call) reloads routed."""
    model = _converted()
    model.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "modify"}
    loaded = modify.from_pretrained(tmp_path / "out") if loader == "modify" else _load_auto(tmp_path / "out")
    assert [s.index for _, s in routed_blocks(loaded)] == [1, 3]
    _same_routers(loaded, model)
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    assert getattr(loaded, "hf_quantizer", None) is None  # nothing is quantized; it trains and saves as usual
    modify.revert(loaded)
    assert "quantization_config" not in loaded.config.to_dict()


def test_trainer_checkpoint_reloads_routed(tmp_path: Path) -> None:
    """A ``transformers.Trainer`` checkpoint directory reloads with the routers and thresholds training left."""
    from transformers import Trainer, TrainingArguments

    model = _converted()
    data = [{"input_ids": row, "labels": row} for row in torch.randint(3, 97, (8, 16))]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        use_cpu=True, save_strategy="steps", save_steps=2,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data).train()
    loaded = modify.from_pretrained(tmp_path / "checkpoint-2")
    _same_routers(loaded, model)
    # The running thresholds training moved: saved with the weights, though Trainer doesn't refresh the plan.
    trained = [float(s.threshold) for _, s in routed_blocks(model)]
    assert all(t == t for t in trained)  # set from the first batch, then moved
    assert [float(s.threshold) for _, s in routed_blocks(loaded)] == trained
    torch.testing.assert_close(loaded.eval()(IDS).logits, model.eval()(IDS).logits, rtol=0, atol=0)


def test_checkpoint_saved_without_the_marker_still_loads(tmp_path: Path) -> None:
    """Saved by a release whose save_pretrained dropped the marker: modify.from_pretrained names the hook."""
    model = _converted()
    model.save_pretrained(tmp_path / "out")
    path = tmp_path / "out" / "config.json"
    config = json.loads(path.read_text())
    del config["quantization_config"]
    path.write_text(json.dumps(config))
    loaded = modify.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["router dropped", "router of an unrouted block"])
def test_routers_that_would_be_dropped_fail_loudly(damage: str, tmp_path: Path) -> None:
    model = _converted()
    model.save_pretrained(tmp_path / "out")
    weights = tmp_path / "out" / "model.safetensors"
    tensors = load_file(weights)
    if damage == "router dropped":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("model.layers.3.mod_router")}
    else:
        tensors.update(
            {k.replace("layers.3", "layers.2"): v.clone() for k, v in tensors.items() if "layers.3.mod_router" in k}
        )
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ModifyError, match="save it again") as info:
        modify.from_pretrained(tmp_path / "out")
    assert "\n" not in str(info.value)


def test_device_map_with_disk_offload(tmp_path: Path) -> None:
    """Routed blocks offloaded to disk: the logits of a plain load, accelerate's hooks kept, revert exact."""
    model = _converted()
    model.save_pretrained(tmp_path / "out")
    reference = modify.from_pretrained(tmp_path / "out")
    placed = _load_auto(tmp_path / "out", device_map=OFFLOAD_MAP, offload_folder=str(tmp_path / "offload"))
    block = placed.model.layers[1]
    assert hasattr(block, "_hf_hook") and block.mlp.down_proj.weight.is_meta  # offloaded
    # The router stays on the block's execution device: it is read outside its own forward (the gate's scale).
    assert block.mod_router.weight.device == torch.device("cpu") and not hasattr(block.mod_router, "_hf_hook")
    torch.testing.assert_close(placed(IDS).logits, reference(IDS).logits, rtol=0, atol=0)
    generated = placed.generate(IDS[:1, :6], max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, reference.generate(IDS[:1, :6], max_new_tokens=4, do_sample=False))
    wrapper = block.forward
    modify.revert(placed)
    assert block.forward is wrapper  # accelerate's wrapper, as accelerate left it
    with modify.routing_disabled(reference):
        dense = reference(IDS).logits
    torch.testing.assert_close(placed(IDS).logits, dense, rtol=0, atol=0)


def test_device_map_auto_with_max_memory(tmp_path: Path) -> None:
    _converted().save_pretrained(tmp_path / "out")
    reference = modify.from_pretrained(tmp_path / "out")
    placed = _load_auto(
        tmp_path / "out", device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=str(tmp_path / "offload")
    )
    assert "disk" in set(placed.hf_device_map.values())
    torch.testing.assert_close(placed(IDS).logits, reference(IDS).logits, rtol=0, atol=0)


def test_convert_an_offloaded_model(tmp_path: Path) -> None:
    """``modify.convert`` of a model accelerate placed with disk offload (transformers' layout: a hook on every
    module with weights) computes what the same conversion computes unplaced; the new routers live on their
    blocks' execution device."""
    tiny_model("llama", attn_implementation="sdpa").save_pretrained(tmp_path / "dense")
    plain = modify.convert(_load_auto(tmp_path / "dense"), capacity=0.5)
    placed = _load_auto(tmp_path / "dense", device_map=OFFLOAD_MAP, offload_folder=str(tmp_path / "offload"))
    modify.convert(placed, capacity=0.5)
    assert placed.model.layers[1].mod_router.weight.device == torch.device("cpu")
    torch.testing.assert_close(placed(IDS).logits, plain(IDS).logits, rtol=0, atol=0)
    modify.revert(placed)
    modify.revert(plain)
    torch.testing.assert_close(placed(IDS).logits, plain(IDS).logits, rtol=0, atol=0)


def test_convert_under_a_block_offload_hook() -> None:
    """A block offloaded whole (accelerate's layout for a GPU with CPU offload: one hook on the block that
    loads all its weights, submodules included, for each call): the new router joins that hook's weights map
    and is offloaded with the block, or the hook would fail to find it."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import set_module_tensor_to_device
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    plain = tiny_model("llama", attn_implementation="sdpa")
    placed = tiny_model("llama", attn_implementation="sdpa")
    block = placed.model.layers[1]
    weights = OffloadedWeightsLoader(
        state_dict={f"model.layers.1.{k}": v.clone() for k, v in block.state_dict().items()}
    )
    for name, _ in list(block.named_parameters()):
        set_module_tensor_to_device(block, name, "meta")
    hook = AlignDevicesHook(
        "cpu", offload=True, weights_map=PrefixedDataset(weights, "model.layers.1."), place_submodules=True
    )
    add_hook_to_module(block, hook)
    torch.testing.assert_close(placed(IDS).logits, plain(IDS).logits, rtol=0, atol=0)
    modify.convert(plain, capacity=0.5)
    modify.convert(placed, capacity=0.5)
    assert block.mod_router.weight.is_meta and "model.layers.1.mod_router.weight" in weights.all_keys
    torch.testing.assert_close(placed(IDS).logits, plain(IDS).logits, rtol=0, atol=0)


def _pristine(model: nn.Module) -> None:
    assert not any(hasattr(m, STATE_ATTR) or "mod_router" in m._modules for m in model.modules())
    assert not any("forward" in m.__dict__ or "generate" in m.__dict__ for m in model.modules())
    assert not hasattr(model.config, "mixture_of_depths") and "quantization_config" not in model.config.to_dict()


@pytest.mark.parametrize("where", ["capture", "install"])
def test_a_failure_at_the_last_block_restores_the_model(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """All or nothing: the training-mode capture of the last routed block fails, or its installation does."""
    import modify.api
    import modify.routing

    model = tiny_model("llama")
    dense = model(IDS).logits
    if where == "capture":
        original = modify.routing.RoutingState.graph

        def failing_graph(self, block, structure):  # type: ignore[no-untyped-def]
            if self.index == 3 and structure.training:
                raise UnsupportedModelError(self.name, "injected failure")
            return original(self, block, structure)

        monkeypatch.setattr(modify.routing.RoutingState, "graph", failing_graph)
    else:
        original = modify.api.install

        def failing_install(block, state, *args):  # type: ignore[no-untyped-def]
            original(block, state, *args)
            if state.index == 3:
                raise RuntimeError("injected failure")

        monkeypatch.setattr(modify.api, "install", failing_install)
    with pytest.raises((UnsupportedModelError, RuntimeError), match="injected failure"):
        modify.convert(model, capacity=0.5, layers="all")
    _pristine(model)
    torch.testing.assert_close(model(IDS).logits, dense, rtol=0, atol=0)
    monkeypatch.undo()
    modify.convert(model, capacity=0.5, layers="all")  # and it converts once the failure is gone
    assert len(routed_blocks(model)) == 4


@pytest.mark.parametrize(
    "implementation", ["flash_attention_2", "flash_attention_3", "flex_attention", "paged|sdpa", "my_kernel"]
)
def test_unrouted_attention_implementations_are_refused(implementation: str) -> None:
    model = tiny_model("llama")
    model.config._attn_implementation = implementation
    with pytest.raises(UnsupportedModelError, match="attn_implementation='sdpa' or 'eager'") as info:
        modify.convert(model, capacity=0.5)
    assert implementation in str(info.value) and "\n" not in str(info.value)
    _pristine(model)


def test_switching_to_flash_after_conversion_is_refused() -> None:
    model = modify.convert(tiny_model("llama"), capacity=0.5)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="flash attention takes no 4-D mask"):
        model(IDS)
