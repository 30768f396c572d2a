"""Calibrate SmolLM2-135M on some of Shakespeare's plays and evaluate zero-shot on the others.

    python examples/calibrate_smollm2.py [--budget 0.75] [--tokens 65536] [--sensitivity-tokens 2048]

Prints, at one FLOP budget (the blocks' forward FLOPs at 512 tokens, as a fraction of dense), the held-out
perplexity of: the dense model; the paper's every-other plan at the largest grid capacity within the budget
(zero routers); the calibrated plan with zero routers; and the calibrated plan with calibrated routers.
No training happens: this is where continued pretraining starts from.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import modify
from modify.calibrate.calibration import CalibrationSettings, apply_calibration, calibrate, token_windows
from modify.flops import block_flops, routed_block_flops
from modify.io.assets import load_smollm2, shakespeare_split
from modify.passes.find_block_stack import find_block_stack


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int = 4) -> float:
    losses = []
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            losses.append(
                model(input_ids=windows[i : i + batch], labels=windows[i : i + batch], use_cache=False).loss.item()
            )
    return math.exp(sum(losses) / len(losses))


def every_other_capacity(model: torch.nn.Module, budget: float, seq_len: int, grid: tuple[float, ...]) -> float:
    """The largest grid capacity at which the paper's every-other plan meets the budget."""
    _, stack = find_block_stack(model)
    dense = block_flops(model, 0, seq_len)
    n = len(stack)
    for c in sorted(grid, reverse=True):
        routed = routed_block_flops(model, 0, c, seq_len)
        if ((n - n // 2) * dense + (n // 2) * routed) <= budget * n * dense:
            return c
    raise ValueError(f"no grid capacity meets budget {budget} with every other block routed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.75, help="FLOP budget of the blocks, as a fraction of dense")
    parser.add_argument("--tokens", type=int, default=65536, help="calibration tokens")
    parser.add_argument("--sensitivity-tokens", type=int, default=2048, help="tokens for the per-block measurements")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out evaluation tokens")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    parser.add_argument("--keep-first", type=int, default=1, help="leading tokens always routed (attention sink)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    calib_files, eval_files = shakespeare_split()
    settings = CalibrationSettings(
        tokens=args.tokens,
        seq_len=args.seq_len,
        budget=args.budget,
        sensitivity_tokens=args.sensitivity_tokens,
        keep_first=args.keep_first,
    )
    windows, data = token_windows(tokenizer, calib_files, args.seq_len, args.tokens)
    held_out, _ = token_windows(tokenizer, eval_files, args.seq_len, args.eval_tokens)

    start = time.perf_counter()
    cal = calibrate(
        model,
        windows,
        data,
        settings,
        progress=lambda stage, done, total: print(f"\r{stage} {done}/{total}", end="", flush=True),
    )
    seconds = time.perf_counter() - start
    print()

    rows = {"dense": perplexity(model, held_out)}
    cap = every_other_capacity(model, args.budget, args.seq_len, settings.grid)
    modify.convert(model, capacity=cap, layers="every-other")
    rows[f"every-other at capacity {cap:g}, zero routers"] = perplexity(model, held_out)
    modify.revert(model)
    modify.convert(model, plan=cal.plan())  # the calibrated plan with fresh, zero routers
    rows["calibrated plan, zero routers"] = perplexity(model, held_out)
    modify.revert(model)
    apply_calibration(model, cal)
    rows["calibrated plan, calibrated routers"] = perplexity(model, held_out)

    print(
        f"calibration: {data['tokens']} tokens from {len(calib_files)} plays in {seconds:.0f} s; "
        f"held out: {held_out.numel()} tokens from {len(eval_files)} plays"
    )
    print(
        f"plan ({cal.cost_ratio:.3f} of dense block FLOPs): "
        + ", ".join(f"{i}:{c:g}" for i, c in enumerate(cal.capacities) if c < 1)
    )
    print(
        f"predicted loss increase {cal.predicted_loss_increase:.3f}, measured {cal.measured_loss - cal.dense_loss:.3f} "
        f"(zero routers {cal.measured_loss_untrained_routers - cal.dense_loss:.3f}) on the sensitivity windows"
    )
    print(
        "router top-k overlap with the oracle: "
        f"{sum(cal.router_overlap.values()) / max(1, len(cal.router_overlap)):.2f} (mean over routed blocks)"
    )
    for name, ppl in rows.items():
        print(f"{name:<45} {ppl:10.2f}  {ppl / rows['dense']:6.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "seconds": seconds, "calibration": cal.to_dict()}, f, indent=2)


if __name__ == "__main__":
    main()
