"""The Python API on a tiny random Llama, in a second on CPU.

python examples/quickstart.py
"""

from __future__ import annotations

import torch

import modify
from modify.testing import tiny_model

model = tiny_model("llama")  # any AutoModelForCausalLM works the same way
ids = torch.randint(3, 97, (2, 32))
dense = model(ids).logits

modify.convert(model, capacity=1.0, layers="all")
assert torch.equal(model(ids).logits, dense)  # capacity 1.0 is the original model
modify.revert(model)

modify.convert(model, capacity=0.125, layers="every-other")  # the paper's plan
for block in modify.find_blocks(model):
    print(block)
print(modify.flops(model, seq_len=32))

# Continued training: routers are ordinary parameters with "router" in their names.
routers = [p for n, p in model.named_parameters() if "router" in n]
optim = torch.optim.AdamW([{"params": routers, "lr": 1e-3}])
model.train()
loss = model(ids, labels=ids).loss
loss.backward()
optim.step()
print(f"loss {loss.item():.3f}; router grad norm {torch.cat([p.grad.flatten() for p in routers]).norm():.2e}")

# Sampling routes causally: each token compares its router score with its block's threshold, fitted on text.
model.eval()
print("thresholds", [round(t, 4) for t in modify.fit_thresholds(model, [ids])])
print("agreement with top-k", {i: round(b["agreement"], 3) for i, b in modify.measure_agreement(model, [ids]).items()})
print("generated", model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False, pad_token_id=0)[0].tolist())
