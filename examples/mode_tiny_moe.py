"""Staged against integrated Mixture-of-Depths-and-Experts on a tiny Qwen3-MoE, at equal FLOPs per token.

A tiny Qwen3-MoE (4 blocks, 8 experts, top-2, character-level) is first trained densely on Shakespeare so
that there is a pretrained function to retrofit. Two copies are then converted at the same forward FLOPs
(``modify.flops``, within one capacity step):

- staged: a Mixture-of-Depths router in front of every other block (the paper's plan);
- integrated: a no-op expert in every block's expert router (``mode="integrated"``).

Both, and the dense model, are trained on for the same steps on the same batches. The held-out loss before
and after is printed (and written with --json). CPU, a few minutes:

    python examples/mode_tiny_moe.py --json runs/mode.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

import modify
from modify.io.assets import shakespeare_split
from modify.testing import tiny_tokenizer
from modify.testing.tiny_configs import tiny_config


def windows(files: list[Path], seq_len: int, limit: int) -> torch.Tensor:
    tok = tiny_tokenizer(128)
    text = "\n".join(f.read_text(errors="ignore") for f in files)[: limit * seq_len * 2]
    ids = torch.tensor(tok(text)["input_ids"])
    count = min(limit, len(ids) // seq_len)
    return ids[: count * seq_len].view(count, seq_len)


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, data: torch.Tensor, batch: int) -> float:
    model.eval()
    losses = [
        model(input_ids=data[i : i + batch], labels=data[i : i + batch]).loss.item() for i in range(0, len(data), batch)
    ]
    model.train()
    return sum(losses) / len(losses)


def train(model: torch.nn.Module, data: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    model.train()
    losses = []
    for step in range(steps):
        rows = order[(torch.arange(batch) + step * batch) % len(data)]
        loss = model(input_ids=data[rows], labels=data[rows]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def matching_capacity(
    model: torch.nn.Module, mode: str, layers: str, budget: float, seq_len: int
) -> tuple[float, float]:
    """The capacity (a multiple of 1/T) whose FLOP ratio is closest to ``budget``, and that ratio."""
    best = None
    for k in range(1, seq_len + 1):
        trial = modify.convert(copy.deepcopy(model), capacity=k / seq_len, layers=layers, mode=mode)
        ratio = modify.flops(trial, seq_len).ratio
        if best is None or abs(ratio - budget) < abs(best[1] - budget):
            best = (k / seq_len, ratio)
    assert best is not None
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.8, help="forward FLOPs of the routed models / dense")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300, help="continued-training steps per variant")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    train_files, eval_files = shakespeare_split()
    data = windows(train_files, args.seq_len, 20000)
    held = windows(eval_files, args.seq_len, 256)
    config = tiny_config(
        "qwen3_moe", vocab_size=128, hidden_size=96, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96
    )
    import transformers

    base = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    start = time.perf_counter()
    train(base, data, args.pretrain_steps, args.batch, 3e-3, seed=1)
    print(f"pretrained {args.pretrain_steps} steps in {time.perf_counter() - start:.0f} s")
    variants = {"dense": (copy.deepcopy(base), 1.0, 1.0)}
    for mode, layers in (("staged", "every-other"), ("integrated", "all")):
        capacity, ratio = matching_capacity(base, mode, layers, args.budget, args.seq_len)
        model = modify.convert(copy.deepcopy(base), capacity=capacity, layers=layers, mode=mode)
        variants[mode] = (model, capacity, ratio)
    rows = {}
    for name, (model, capacity, ratio) in variants.items():
        before = held_out_loss(model, held, args.batch)
        start = time.perf_counter()
        losses = train(model, data, args.steps, args.batch, 1e-3, seed=2)
        after = held_out_loss(model, held, args.batch)
        rows[name] = {
            "capacity": capacity,
            "flop_ratio": round(ratio, 4),
            "held_out_before": round(before, 4),
            "held_out_after": round(after, 4),
            "train_first": round(losses[0], 4),
            "train_last10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(name, rows[name], f"ppl {math.exp(after):.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
