"""Causal routing on SmolLM2-135M: how well each rule predicts top-k, and what sampling with it costs.

    python examples/causal_routing_smollm2.py [--calibration runs/causal/calibration.pt] [--steps 100]

Two plans, both with routers fitted by calibration on the plays titled A–L: the plan calibrated at a FLOP
budget of 0.75 (pure Mixture-of-Depths: no skip paths), and the paper's plan (capacity 0.125 on every other
block) with the calibrated routers. For each plan and each causal rule, on held-out plays (titled M–Z):

- ``agreement``: the share of tokens whose causal decision equals their top-k membership (the paper's
  predictor accuracy), over the tokens a block decides (the always-processed first token left out), per block
  and pooled; ``causal_share`` and ``topk_share``: the shares each rule processes;
- perplexity with top-k routing (the training rule) and with causal routing (what ``generate()`` runs).

Rules: ``threshold`` zero-shot (the (1 - c) quantile of each router's scores on calibration text), with the
best fixed threshold chosen on the held-out text itself beside it (an oracle: what no threshold rule can
beat there); ``aux`` and ``predictor`` after a short run of a minimal training loop (AdamW, the model frozen;
loss = language-model loss + aux_loss_coef × the rule's BCE on top-k membership): for aux the routers train
(from the threshold rule: their bias lowered by the threshold, which top-k ignores), for predictor the
predictors alone (which start from the threshold rule's decisions by construction). Writes RESULTS.json and,
for ``benchmarks/bench_decode.py``, the paper's plan with the threshold rule as a converted model directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch

import modify
from modify.api import routed_blocks
from modify.calibrate.calibration import (
    CalibrationSettings,
    calibrate,
    load_router,
    replan,
    token_windows,
)
from modify.config import MoDConfig
from modify.io.assets import shakespeare_split
from modify.io.checkpoint import load_source, resolve_source, save_converted

RULES = ("threshold", "aux", "predictor")


def batches(windows: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [windows[i : i + size] for i in range(0, len(windows), size)]


def perplexity(model: torch.nn.Module, windows: torch.Tensor, mode: str = "") -> float:
    losses = []
    routed = modify.routing_mode(model, mode) if mode else contextlib.nullcontext()
    with torch.no_grad(), routed:
        for w in batches(windows, 4):
            out = model(input_ids=w, labels=w, use_cache=False)
            losses.append(float(getattr(out, "lm_loss", None) or out.loss))
    return math.exp(sum(losses) / len(losses))


def evaluate(model: torch.nn.Module, held_out: torch.Tensor) -> dict:
    blocks = modify.measure_agreement(model, batches(held_out, 4))
    weights = [b["agreement"] for b in blocks.values()]
    row = {
        "agreement": sum(weights) / len(weights),
        "min_block_agreement": min(weights),
        "causal_share": sum(b["causal_share"] for b in blocks.values()) / len(blocks),
        "topk_share": sum(b["topk_share"] for b in blocks.values()) / len(blocks),
        "ppl_topk": perplexity(model, held_out, "topk"),
        "ppl_causal": perplexity(model, held_out, "causal"),
        "blocks": blocks,
    }
    return row


@torch.no_grad()
def oracle_agreement(model: torch.nn.Module, held_out: torch.Tensor) -> dict[int, float]:
    """Per block: the agreement of the best fixed threshold on the router's scores, chosen on the held-out text
    itself. No threshold rule can do better on this text; the gap to 1 is what per-sequence top-k decides
    that no per-token threshold can (the score distribution shifts from sequence to sequence)."""
    pairs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    found = routed_blocks(model)

    def observer(state):  # type: ignore[no-untyped-def]
        def observe(scores: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor) -> None:
            member = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
            pairs.setdefault(state.index, []).append((scores[:, state.keep_first :], member[:, state.keep_first :]))

        return observe

    for _, state in found:
        state.observer = observer(state)
    try:
        with modify.routing_mode(model, "topk"):
            for w in batches(held_out, 4):
                model(input_ids=w, use_cache=False)
    finally:
        for _, state in found:
            state.observer = None
    best = {}
    for index, items in pairs.items():
        scores = torch.cat([s.flatten() for s, _ in items])
        member = torch.cat([m.flatten() for _, m in items])[scores.argsort(descending=True)].double()
        # processing the top j scores: members among them agree, non-members after them agree
        hits = torch.cat([torch.zeros(1, dtype=torch.float64), member.cumsum(0)])
        j = torch.arange(len(member) + 1, dtype=torch.float64)
        agree = hits + (len(member) - j) - (member.sum() - hits)
        best[index] = float(agree.max() / len(member))
    return best


def train(model: torch.nn.Module, windows: torch.Tensor, trains: str, steps: int, lr: float, batch: int) -> list[float]:
    """A minimal loop: AdamW on the parameters whose names contain ``trains``, everything else frozen; returns
    the aux losses. The loss is the model's ``outputs.loss`` (language model + aux_loss_coef × aux)."""
    for name, p in model.named_parameters():
        p.requires_grad_(trains in name)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))
    aux = []
    model.train()
    with modify.routing_mode(model, "topk"):
        for step in range(steps):
            pick = order[(step * batch) % len(windows) :][:batch]
            w = windows[pick]
            out = model(input_ids=w, labels=w, use_cache=False)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            aux.append(float(out.aux_loss.detach()))
            if (step + 1) % 25 == 0:
                print(f"    step {step + 1}: lm {float(out.lm_loss.detach()):.3f} aux {aux[-1]:.4f}", flush=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return aux


def apply(model: torch.nn.Module, cal, capacities: list[float], rule: str, coef: float = 0.01) -> None:  # type: ignore[no-untyped-def]
    routed = [i for i, c in enumerate(capacities) if c < 1]
    plan = MoDConfig(len(capacities), routed, [capacities[i] for i in routed], keep_first=cal.settings["keep_first"],
                     causal=rule, aux_loss_coef=coef)  # fmt: skip
    modify.convert(model, plan=plan)
    for block, state in routed_blocks(model):
        load_router(block.mod_router, cal.candidates["routers"][state.index])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/causal"))
    parser.add_argument("--calibration", type=Path, help="a calibration saved by this script or skip_paths_smollm2.py")
    parser.add_argument("--budget", type=float, default=0.75)
    parser.add_argument("--tokens", type=int, default=65536, help="calibration tokens")
    parser.add_argument("--threshold-tokens", type=int, default=16384, help="calibration tokens for the thresholds")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--aux-steps", type=int, default=100)
    parser.add_argument("--predictor-steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--router-lr", type=float, default=1e-4, help="calibrated routers' weights are ~0.05 in norm")
    parser.add_argument("--predictor-lr", type=float, default=1e-3)
    parser.add_argument("--aux-coef", type=float, default=0.1, help="aux_loss_coef of the aux run")
    parser.add_argument("--plans", nargs="+", default=["calibrated", "paper"])
    parser.add_argument("--rules", nargs="+", default=list(RULES))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    source = resolve_source("smollm2")
    model, tokenizer = load_source(source)  # as `modify convert` loads it (savable)
    plays_calib, plays_eval = shakespeare_split()
    held_out = token_windows(tokenizer, plays_eval, args.seq_len, args.eval_tokens)[0]
    windows, data = token_windows(tokenizer, plays_calib, args.seq_len, args.tokens)
    cached = args.calibration or args.out / "calibration.pt"
    if cached.is_file():
        cal, _ = torch.load(cached, weights_only=False)
    else:
        settings = CalibrationSettings(tokens=args.tokens, seq_len=args.seq_len, budget=args.budget)
        start = time.perf_counter()
        cal = calibrate(
            model,
            windows,
            data,
            settings,
            progress=lambda stage, done, total: print(f"\r{stage} {done}/{total} ", end="", flush=True),
        )
        torch.save((cal, time.perf_counter() - start), cached)
    dense = perplexity(model, held_out)
    path = args.out / "RESULTS.json"
    results: dict = json.loads(path.read_text()) if path.is_file() else {"plans": {}}
    results.update(dense_ppl=dense, settings={k: str(v) for k, v in vars(args).items()})
    print(f"dense held-out perplexity {dense:.2f}", flush=True)
    fit_text = batches(windows[: max(1, args.threshold_tokens // args.seq_len)], 4)
    n = cal.num_blocks
    plans = {
        # the planner's pure Mixture-of-Depths choice (no skip paths) from the calibration's measurements
        "calibrated": [c for c, _ in replan(cal, model, args.budget, args.seq_len).capacities],
        "paper": [0.125 if i % 2 == 1 else 1.0 for i in range(n)],
    }
    for name in args.plans:
        capacities = plans[name]
        rows = results["plans"].get(name, {}).get("rules", {})
        for rule in args.rules:
            apply(model, cal, capacities, rule, args.aux_coef if rule == "aux" else 0.01)
            thresholds = modify.fit_thresholds(model, fit_text)
            aux = []
            start = time.perf_counter()
            if rule == "threshold" and name == "paper":
                save_converted(model, tokenizer, args.out / "paper-threshold", source, force=True)
            if rule == "aux":
                # Start from the threshold rule (top-k ignores the bias, aux decides at 0); then the routers
                # learn from the language model and the aux loss.
                for (block, _), t in zip(routed_blocks(model), thresholds):
                    block.mod_router.bias.data -= t
                print(f"  {name} aux: training the routers {args.aux_steps} steps", flush=True)
                aux = train(model, windows, "mod_router", args.aux_steps, args.router_lr, args.batch)
            elif rule == "predictor":  # the predictors alone: the language model and the routers stay as calibrated
                print(f"  {name} predictor: training the predictors {args.predictor_steps} steps", flush=True)
                aux = train(model, windows, "mod_predictor", args.predictor_steps, args.predictor_lr, args.batch)
            train_seconds = time.perf_counter() - start
            row = evaluate(model, held_out)
            row.update(train_seconds=train_seconds, aux_losses=aux[:: max(1, len(aux) // 20)])
            row["capacity_of_block"] = {s.index: s.capacity for _, s in routed_blocks(model)}
            if rule == "threshold":
                oracle = oracle_agreement(model, held_out)
                row["oracle_threshold_blocks"] = oracle
                row["oracle_threshold_agreement"] = sum(oracle.values()) / len(oracle)
                print(f"{name:<10} oracle    best fixed threshold chosen on the held-out text: agreement "
                      f"{row['oracle_threshold_agreement']:.4f}", flush=True)  # fmt: skip
            rows[rule] = row
            print(
                f"{name:<10} {rule:<9} agreement {row['agreement']:.4f} (min block {row['min_block_agreement']:.4f}) "
                f"shares causal {row['causal_share']:.3f} top-k {row['topk_share']:.3f}  "
                f"ppl top-k {row['ppl_topk']:.2f} causal {row['ppl_causal']:.2f} (dense {dense:.2f})",
                flush=True,
            )
            flops = modify.flops(model, args.seq_len)
            row["block_flops_ratio"] = sum(r for _, r in flops.blocks) / sum(d for d, _ in flops.blocks)
            modify.revert(model)  # the runs trained the routers and predictors only, which go with it
            routed = [i for i, c in enumerate(capacities) if c < 1]
            results["plans"][name] = {"routed": routed, "capacities": [capacities[i] for i in routed], "rules": rows}
            path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
