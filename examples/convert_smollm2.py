"""Convert SmolLM2-135M-Instruct to Mixture-of-Depths and look at what changed.

    python examples/convert_smollm2.py [--capacity 0.125] [--layers every-other] [--tokens 256]

Fetches the GGUF checkpoint on first use (see modify.io.assets), converts it in memory with the paper's plan,
prints the block table and the FLOPs, and measures perplexity on a Shakespeare passage for the dense model,
the conversion at capacity 1.0 (identical by construction) and the chosen plan. The routers are untrained:
the plan's zero-shot perplexity shows how far continued training has to go, not what MoD can reach.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import modify
from modify.io.assets import load_smollm2, shakespeare_texts


def perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(model(ids, labels=ids, use_cache=False).loss.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capacity", type=float, default=0.125, help="capacity of the routed blocks")
    parser.add_argument("--layers", default="every-other", help="'every-other', 'all' or e.g. '14,17,20'")
    parser.add_argument("--tokens", type=int, default=256, help="length of the evaluation passage")
    args = parser.parse_args()
    layers = args.layers if args.layers in ("all", "every-other") else [int(i) for i in args.layers.split(",")]

    model, tokenizer = load_smollm2()
    text = shakespeare_texts()[-1].read_text(errors="ignore")[30000:60000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]

    dense = perplexity(model, ids)
    modify.convert(model, capacity=1.0, layers=layers)
    identity = perplexity(model, ids)
    modify.revert(model)

    start = time.perf_counter()
    modify.convert(model, capacity=args.capacity, layers=layers)
    seconds = time.perf_counter() - start
    routed = perplexity(model, ids)

    print(f"{'block':>5}  {'name':<18} {'form':<10} {'delta':<10} capacity")
    for b in modify.find_blocks(model):
        print(f"{b.index:>5}  {b.name:<18} {b.form:<10} {b.delta:<10} {b.capacity if b.routed else '-'}")
    count = modify.flops(model, ids.shape[1])
    print(f"\nconverted in {seconds:.2f} s")
    print(f"forward FLOPs at T={ids.shape[1]}: dense {count.dense:.3e}, routed {count.routed:.3e} ({count.ratio:.1%})")
    print(f"perplexity: dense {dense:.2f} | capacity 1.0 {identity:.2f} | plan, untrained routers {routed:.2f}")


if __name__ == "__main__":
    main()
