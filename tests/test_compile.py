"""torch.compile over a routed block and a whole converted model: one graph, no breaks, same result as eager."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import modify
from modify.api import routed_blocks
from modify.io.checkpoint import Source, save_converted
from modify.testing import tiny_model
from tests.helpers import set_router_weights


def test_routed_block_compiles_without_graph_breaks() -> None:
    model = tiny_model("llama")
    modify.convert(model, capacity=0.5, layers=[1])
    block = model.model.layers[1]
    seen: dict = {}
    hook = block.register_forward_pre_hook(lambda m, a, kw: seen.update(args=a, kwargs=kw), with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(3, 97, (2, 16)), use_cache=False)
    hook.remove()
    with torch.no_grad():
        eager = block(*seen["args"], **seen["kwargs"])
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True, backend="inductor")(*seen["args"], **seen["kwargs"])
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    # The routing ops stay one named node each in the captured graph.
    gm, _ = torch._dynamo.export(block)(*seen["args"], **seen["kwargs"])
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "modify.gather_tokens.default" in targets and "modify.gated_scatter_add.default" in targets


def _dynamo_graphs(model: torch.nn.Module, ids: torch.Tensor, **kwargs: Any) -> tuple[int, int, list[str]]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids, **kwargs)
    return explained.graph_count, explained.graph_break_count, [str(b.reason)[:200] for b in explained.break_reasons]


def _fresh(dtype: torch.dtype, kv: str = "routed") -> torch.nn.Module:
    model = tiny_model("llama").to(dtype)
    return modify.convert(model, capacity=0.5, layers="all", kv=kv)  # the default threshold rule tracks in training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("kv", ["routed", "all"])
def test_fresh_conversion_compiles_to_one_graph(dtype: torch.dtype, training: bool, kv: str) -> None:
    """No eager call first: the Δ graphs (kv='all': their two sides) were captured at conversion, so dynamo sees
    one graph and no break, with the cache the plain call builds and without it, with a padding mask and without."""
    model = _fresh(dtype, kv).train(training)
    ids = torch.randint(3, 97, (2, 16))
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    for kwargs in ({}, {"use_cache": False}, {"attention_mask": padded, "labels": ids}):
        assert _dynamo_graphs(model, ids, **kwargs) == (1, 0, [])


def test_loaded_model_compiles_to_one_graph(tmp_path: Path) -> None:
    out = save_converted(_fresh(torch.float32), None, tmp_path / "out", Source("directory", tmp_path))
    loaded = modify.from_pretrained(out, attn_implementation="eager")
    assert _dynamo_graphs(loaded.eval(), torch.randint(3, 97, (2, 16))) == (1, 0, [])


@pytest.mark.parametrize("kv", ["routed", "all"])
def test_compiled_training_step_matches_eager_without_recompiles(kv: str) -> None:
    """fullgraph=True raises on any break; a second step at the same shapes must not recompile."""
    eager = _fresh(torch.float32, kv).train()
    set_router_weights(eager)
    for _, state in routed_blocks(eager):
        state.threshold = 0.0  # fitted: it moves by a share of each batch's quantile (an unfitted one jumps to it)
    compiled = copy.deepcopy(eager)
    ids = torch.randint(3, 97, (2, 16))
    eager(ids, labels=ids).loss.backward()
    torch._dynamo.reset()
    step = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            step(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    assert any("mod_router" in n for n in grads)
    for n, p in compiled.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, 2 * grads[n], atol=1e-5, rtol=1e-4)  # two steps accumulated
    # the running threshold moved inside the compiled graph, twice from where eager's moved once
    (_, once), (_, twice) = routed_blocks(eager)[0], routed_blocks(compiled)[0]
    assert 0.0 != once.threshold != twice.threshold


@pytest.mark.parametrize("kv", ["routed", "all"])
def test_compiled_decode_matches_eager_and_stops_compiling(kv: str) -> None:
    """Sampling through a compiled forward: the routed blocks' per-token path runs eagerly (its work depends on
    the decision it reads), so the steps give eager's tokens, and once the cache grows (dynamic shapes) no step
    compiles anything again. Traced, the path broke in every routed block and recompiled per block."""
    from tests.generate.test_generate import routed_model

    model = routed_model("llama", attn="sdpa", kv=kv).eval()
    prompt = torch.randint(3, 90, (2, 7))

    def decode(forward: Any) -> list[torch.Tensor]:
        with torch.no_grad(), modify.routing_mode(model, "causal"):
            out = model(prompt, use_cache=True)
            cache, tokens = out.past_key_values, [out.logits[:, -1:].argmax(-1)]
            for _ in range(10):
                tokens.append(forward(input_ids=tokens[-1], past_key_values=cache, use_cache=True).logits.argmax(-1))
        return tokens

    expected = decode(model.forward)
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend="aot_eager", dynamic=True)
    got = decode(compiled)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    with torch._dynamo.config.patch(error_on_recompile=True):
        decode(compiled)  # a second generation: new cache objects, the same shapes and code
