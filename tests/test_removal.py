"""Static removal: a block at capacity 0 runs nothing, costs nothing, and equals the model without it.

    x ──► [block 0: capacity 0] ──► [block 1] ──► [block 2: capacity 0] ──► [block 3] ──► head
          router, attention, MLP                   (no hook fires,
          never called: y = x                        no FLOPs)

must give exactly the logits (forward and greedy ``generate()`` with a cache) of

    x ──► [block 1 → 0] ──► [block 3 → 1] ──► head         (modify.remove_blocks, layer_idx renumbered)

and :func:`modify.export_pruned` writes that model as a checkpoint plain transformers loads.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import modify
from modify.errors import NotRemovalOnlyError
from modify.removal import check_removal_plan, remove_blocks
from modify.routing import capacity_tokens
from modify.routing.router import ROUTER_ATTR
from modify.testing import tiny_model

REMOVED = [0, 2]  # block 0 included: transformers reads positions and mask sizes off the first cache layer


def _ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_capacity_tokens_zero_only_at_zero() -> None:
    assert capacity_tokens(0.0, 512) == 0
    # Any capacity above 0 still routes at least one token, however short the sequence.
    assert capacity_tokens(1e-9, 4) == 1
    assert capacity_tokens(0.125, 1) == 1
    assert capacity_tokens(0.3, 10) == 3


def test_config_accepts_zero_and_names_removed_blocks() -> None:
    plan = modify.MoDConfig(4, [0, 2, 3], [0.0, 0.5, 0.0])
    assert plan.removed == [0, 3]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        modify.MoDConfig(4, [1], [-0.1])
    with pytest.raises(ValueError, match="staged only"):
        modify.MoDConfig(4, [1], [0.0], mode="integrated")


def test_removed_block_runs_nothing() -> None:
    model = tiny_model("llama")
    modify.convert(model, capacity=0.0, layers=[1])
    block = model.model.layers[1]
    fired: list[str] = []
    for name in ("self_attn", "mlp", "input_layernorm", ROUTER_ATTR):
        block.get_submodule(name).register_forward_hook(lambda m, a, o, _n=name: fired.append(_n))
    model.model.layers[0].self_attn.register_forward_hook(lambda m, a, o: fired.append("block 0"))
    with torch.no_grad():
        model(_ids())
        model.generate(_ids(1), max_new_tokens=3, do_sample=False)
        with modify.routing_mode(model, "causal"):
            model(_ids())
    assert fired and set(fired) == {"block 0"}  # the hooks work; none on the removed block fired


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_removed_block_counts_no_flops(family: str) -> None:
    model = tiny_model(family)
    modify.convert(model, capacity=[0.0, 0.5], layers=[0, 1])
    count = modify.flops(model, 64, 2)
    assert count.blocks[0] == (count.blocks[0][0], 0)
    assert count.blocks[1][1] > 0
    ids = torch.randint(3, 97, (2, 64))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids, use_cache=False)
    assert count.routed == counter.get_total_flops()


def test_removed_block_with_skip_path_costs_only_the_path() -> None:
    model = tiny_model("llama")
    modify.convert(model, capacity=0.0, layers=[1], skip_path="linear", skip_rank=8)
    hidden = model.config.hidden_size
    assert modify.flops(model, 64).blocks[1][1] == 64 * 4 * hidden * 8
    # The path's estimate reaches every token: give it a nonzero output layer and compare by hand.
    path = model.model.layers[1].mod_skip_path
    torch.nn.init.normal_(path.up.weight)
    captured: dict[str, torch.Tensor] = {}

    def record(module: torch.nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        captured["x"] = kwargs.get("hidden_states", args[0] if args else None)
        captured["out"] = out[0] if isinstance(out, tuple) else out

    model.model.layers[1].register_forward_hook(record, with_kwargs=True)
    with torch.no_grad():
        model(_ids())
        x = captured["x"]
        expected = x + path(model.model.layers[1].input_layernorm(x))
    torch.testing.assert_close(captured["out"], expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_removal_equals_the_model_without_the_blocks(family: str) -> None:
    model = tiny_model(family)
    deleted = remove_blocks(copy.deepcopy(model), REMOVED)
    modify.convert(model, capacity=0.0, layers=REMOVED)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, deleted(ids).logits)
        prompt = _ids(1, 9, seed=1)
        ours = model.generate(prompt, max_new_tokens=10, do_sample=False)
        theirs = deleted.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, theirs)


def test_removal_with_routed_blocks_generates_with_a_cache() -> None:
    """Removed first block beside blocks routed causally: generate() with the cache still runs, and the
    cache's length (read off layer 0, the removed one) follows every step."""
    model = tiny_model("llama")
    modify.convert(model, capacity=[0.0, 0.5], layers=[0, 1])
    prompt = _ids(1, 9)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape[1] == 15
    assert out.past_key_values.get_seq_length() == 14


def test_remove_blocks_renumbers_and_updates_config() -> None:
    model = tiny_model("gemma2")
    types = list(model.config.layer_types)
    remove_blocks(model, [1])
    layers = model.model.layers
    assert len(layers) == model.config.num_hidden_layers == 3
    assert model.config.layer_types == [types[0], types[2], types[3]]
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]


def test_remove_blocks_refuses_bad_input() -> None:
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="out of range"):
        remove_blocks(model, [7])
    with pytest.raises(ValueError, match="no model"):
        remove_blocks(model, [0, 1, 2, 3])
    modify.convert(model, capacity=0.0, layers=[1])
    with pytest.raises(ValueError, match="export_pruned"):
        remove_blocks(model, [1])


def test_export_pruned_is_plain_and_exact(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    modify.convert(model, capacity=0.0, layers=REMOVED)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    modify.export_pruned(model)
    model.save_pretrained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    assert "mixture_of_depths" not in saved and "quantization_config" not in saved
    assert "mod_router" not in str(list(model.state_dict()))
    # The same attention kernel as the tiny model's (eager); a plain load would pick sdpa, equal only to ~1e-7.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"capacity": [0.0, 0.5], "layers": [0, 1]}, r"blocks 1 are routed at capacities in \(0, 1\)"),
        ({"capacity": 0.0, "layers": [1], "skip_path": "linear", "skip_rank": 4}, "removed blocks 1 have skip paths"),
    ],
)
def test_export_pruned_refuses_plans_that_route(kwargs: dict, match: str) -> None:
    model = tiny_model("llama")
    modify.convert(model, **kwargs)
    with pytest.raises(NotRemovalOnlyError, match=match) as info:
        modify.export_pruned(model)
    assert "\n" not in str(info.value)
    assert modify.find_blocks(model)[1].routed  # nothing changed


def test_plans_are_checked_before_any_weights_load() -> None:
    assert check_removal_plan(
        modify.MoDConfig(4, [0, 1, 3], [0.0, 1.0, 0.0], skip_paths=["identity", "linear-4", "identity"])
    ) == [0, 3]
    with pytest.raises(NotRemovalOnlyError, match="blocks 1, 2 are routed"):
        check_removal_plan(modify.MoDConfig(4, [1, 2], [0.5, 0.25]))
    with pytest.raises(NotRemovalOnlyError, match="blocks 1 are routed"):  # a no-op expert routes whatever c is
        check_removal_plan(modify.MoDConfig(4, [1], [1.0], mode="integrated"))


def test_export_pruned_refuses_a_trained_gate_at_capacity_one() -> None:
    model = tiny_model("llama")
    modify.convert(model, capacity=[0.0, 1.0], layers=[0, 1])
    with torch.no_grad():
        model.model.layers[1].mod_router.scale.fill_(0.5)
    with pytest.raises(NotRemovalOnlyError, match="trained gate"):
        modify.export_pruned(model)
    model.model.layers[1].mod_router.scale.data.zero_()
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(modify.export_pruned(model)(ids).logits, expected)
