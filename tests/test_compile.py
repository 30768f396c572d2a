"""torch.compile(fullgraph=True) over a routed block: no graph breaks, same result as eager."""

from __future__ import annotations

import torch

import modify
from modify.testing import tiny_model


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
