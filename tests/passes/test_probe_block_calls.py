from __future__ import annotations

import torch

from modify.passes import find_block_stack, probe_block_calls
from modify.testing import tiny_model


def test_probe_finds_per_token_arguments_of_llama() -> None:
    model = tiny_model("llama")
    _, stack = find_block_stack(model)
    spec = probe_block_calls(model, list(stack))[0]
    assert spec.hidden == "hidden_states" and spec.hidden_size == 32
    assert spec.token_dims[("position_ids",)] == (1,)
    assert spec.token_dims[("position_embeddings", 0)] == (1,)
    assert spec.token_dims[("attention_mask",)] == (2, 3)
    assert spec.pairwise == ("attention_mask",)
    assert ("use_cache",) not in spec.token_dims


def test_probe_leaves_the_model_as_it_was() -> None:
    model = tiny_model("gpt2").train()
    model.transformer.h[0].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    _, stack = find_block_stack(model)
    probe_block_calls(model, list(stack))
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and not model.transformer.h[0].training and model.transformer.h[1].training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_step_by_step_as_documented() -> None:
    """The walk-through in modify.passes' docstring, on a real family."""
    from modify import passes

    model = tiny_model("gemma2")
    stack_name, stack = passes.find_block_stack(model)
    specs = passes.probe_block_calls(model, list(stack))
    gm = passes.capture_block(stack[0], specs[0].structure)
    analysis = passes.analyze_residual(gm, specs[0].hidden)
    assert stack_name == "model.layers" and analysis.form == "sandwich" and len(analysis.branches) == 2
    assert passes.ExtractDeltaPass(specs[0].hidden)(gm).modified
    assert "block.self_attn" in gm.code.replace("self.block.self_attn", "block.self_attn")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert output.meta["modify"]["delta"] == "exact"
