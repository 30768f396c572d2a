"""Skip paths against pure Mixture-of-Depths on SmolLM2-135M, zero-shot, at one FLOP budget.

    python examples/skip_paths_smollm2.py [--budget 0.75] [--tokens 65536] [--out runs/skip_paths]

Calibrates twice, each time measuring every candidate skip path (identity, linear at ranks 8, 32 and 128,
an MLP with 96 hidden units, 1/16 of the block's): once on the plays titled A–L, once on a mix of those plays
and Python's reference documentation (``pydoc_data.topics``, shipped with CPython; topics A–H). For each
variant the planner chooses blocks, capacities and where to use the path under the same budget (identity
always allowed), from the same measurements: re-planning with fewer candidates is what calibrating with fewer
candidates computes. Each plan is evaluated zero-shot on held-out plays (titled M–Z), held-out documentation
(topics I–Z) and a third kind in neither calibration set: the project descriptions (READMEs) of some installed
packages. Two ablations per calibration tell the plan's part from the path's: the linear-128 plan with its
paths removed, and the pure-MoD plan with linear-128 paths added on its blocks (over budget by their FLOPs).
Writes RESULTS.json; each calibration is kept in OUT and reused when run again.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import modify
from modify.api import routed_blocks
from modify.calibrate.calibration import (
    Calibration,
    CalibrationSettings,
    calibrate,
    load_router,
    replan,
    token_windows,
)
from modify.config import MoDConfig
from modify.io.assets import load_smollm2, shakespeare_split
from modify.routing.router import ROUTER_ATTR
from modify.routing.skip_path import SKIP_ATTR

VARIANTS = ("identity", "linear-8", "linear-32", "linear-128", "mlp-96")


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int = 4) -> float:
    losses = []
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            w = windows[i : i + batch]
            losses.append(model(input_ids=w, labels=w, use_cache=False).loss.item())
    return math.exp(sum(losses) / len(losses))


def docs_files(out: Path) -> tuple[Path, Path]:
    """Python's reference documentation as two text files: topics before "i" (calibration) and the rest."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    first, second = out / "docs_a-h.txt", out / "docs_i-z.txt"
    first.write_text("\n\n".join(topics[n] for n in names if n < "i"))
    second.write_text("\n\n".join(topics[n] for n in names if n >= "i"))
    return first, second


#: Packages whose long descriptions (READMEs, in their installed METADATA) make the third held-out text.
README_PACKAGES = ("transformers", "torch", "numpy", "networkx", "peft", "accelerate", "rich", "matplotlib",
                   "huggingface_hub", "pytest", "safetensors", "tokenizers")  # fmt: skip


def readme_file(out: Path) -> tuple[Path, dict[str, str]]:
    """The installed READMEs of ``README_PACKAGES`` (those present) as one text file, and their versions."""
    import importlib.metadata as md

    texts, versions = [], {}
    for name in README_PACKAGES:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        body = dist.read_text("METADATA") or ""
        texts.append(body.split("\n\n", 1)[1] if "\n\n" in body else "")
        versions[name] = dist.version
    path = out / "readmes.txt"
    path.write_text("\n\n".join(texts))
    return path, versions


def plan_for(cal: Calibration, model: torch.nn.Module, variant: str, budget: float, seq_len: int) -> dict:
    """The planner's choice with identity and ``variant`` as the only skip paths, from ``cal``'s measurements."""
    specs = ("identity",) if variant == "identity" else ("identity", variant)
    chosen = replan(cal, model, budget, seq_len, specs)
    return {
        "capacities": [c for c, _ in chosen.capacities],
        "skip_paths": [s for _, s in chosen.capacities],
        "cost_ratio": chosen.cost_ratio,
        "predicted": chosen.predicted_loss_increase,
    }


def ablations(model: torch.nn.Module, cal: Calibration, held_out: dict, dense: dict, args: argparse.Namespace) -> dict:
    """Is it the plan or the path? Held-out perplexity over dense for two mixtures of the two."""
    linear = plan_for(cal, model, "linear-128", args.budget, args.seq_len)
    pure = plan_for(cal, model, "identity", args.budget, args.seq_len)
    pure_with_paths = dict(pure, skip_paths=["linear-128" if c < 1 else "identity" for c in pure["capacities"]])
    rows = {}
    for name, plan, strip in [
        ("linear-128 plan, paths removed", linear, True),
        ("pure-MoD plan, linear-128 paths added", pure_with_paths, False),
    ]:
        apply_plan(model, cal, plan)
        if strip:
            for block, state in routed_blocks(model):
                if hasattr(block, SKIP_ATTR):
                    delattr(block, SKIP_ATTR)
                state.skip_path = "identity"  # so that modify.flops no longer counts it
        flops = modify.flops(model, args.seq_len)
        blocks = sum(r for _, r in flops.blocks) / sum(d for d, _ in flops.blocks)
        rows[name] = {"block_flops": blocks, **{k: perplexity(model, w) / dense[k] for k, w in held_out.items()}}
        modify.revert(model)
        print(f"  ablation: {name:<40} block FLOPs {blocks:.3f} "
              + "  ".join(f"{k} {rows[name][k]:.2f}x" for k in held_out), flush=True)  # fmt: skip
    return rows


def apply_plan(model: torch.nn.Module, cal: Calibration, plan: dict) -> None:
    routed = [i for i, c in enumerate(plan["capacities"]) if c < 1]
    config = MoDConfig(
        cal.num_blocks,
        routed,
        [plan["capacities"][i] for i in routed],
        keep_first=cal.settings["keep_first"],
        skip_paths=[plan["skip_paths"][i] for i in routed],
    )
    modify.convert(model, plan=config)
    for i in routed:
        block = model.model.layers[i]
        load_router(getattr(block, ROUTER_ATTR), cal.candidates["routers"][i])
        spec = plan["skip_paths"][i]
        if spec != "identity":
            weights = cal.candidates["skips"][i, plan["capacities"][i], spec]
            getattr(block, SKIP_ATTR).load_state_dict(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.75)
    parser.add_argument("--tokens", type=int, default=65536, help="calibration tokens")
    parser.add_argument("--sensitivity-tokens", type=int, default=2048)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("runs/skip_paths"))
    parser.add_argument("--only-plays", action="store_true", help="skip the mixed calibration")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_smollm2()
    plays_calib, plays_eval = shakespeare_split()
    docs_calib, docs_eval = docs_files(args.out)
    readmes, versions = readme_file(args.out)
    held_out = {
        "plays": token_windows(tokenizer, plays_eval, args.seq_len, args.eval_tokens)[0],
        "docs": token_windows(tokenizer, [docs_eval], args.seq_len, args.eval_tokens)[0],
        "readmes": token_windows(tokenizer, [readmes], args.seq_len, args.eval_tokens)[0],
    }
    results: dict = {
        "dense": {k: perplexity(model, w) for k, w in held_out.items()},
        "readme_packages": versions,
        "calibrations": {},
    }
    print("dense", results["dense"], flush=True)

    plays, plays_data = token_windows(tokenizer, plays_calib, args.seq_len, args.tokens)
    half = args.tokens // 2
    mix_plays, _ = token_windows(tokenizer, plays_calib, args.seq_len, half)
    mix_docs, docs_data = token_windows(tokenizer, [docs_calib], args.seq_len, half)
    # Interleaved, so that the sensitivity windows (a seeded sample) hold both kinds.
    mix = torch.stack([w for pair in zip(mix_plays, mix_docs) for w in pair])
    mix_data = {"files": plays_data["files"] + docs_data["files"], "tokens": mix.numel(), "windows": len(mix)}
    sources = {"plays": (plays, plays_data), "plays+docs": (mix, mix_data)}
    if args.only_plays:
        sources.pop("plays+docs")

    settings = CalibrationSettings(
        tokens=args.tokens,
        seq_len=args.seq_len,
        budget=args.budget,
        sensitivity_tokens=args.sensitivity_tokens,
        skip_paths=VARIANTS,
    )
    for name, (windows, data) in sources.items():
        cached = args.out / f"calibration-{name}.pt"
        if cached.is_file():
            cal, seconds = torch.load(cached, weights_only=False)
        else:
            start = time.perf_counter()
            cal = calibrate(
                model,
                windows,
                data,
                settings,
                progress=lambda stage, done, total: print(f"\r{stage} {done}/{total}   ", end="", flush=True),
            )
            seconds = time.perf_counter() - start
            torch.save((cal, seconds), cached)
        print(f"\ncalibrated on {name} in {seconds:.0f} s", flush=True)
        rows = {}
        for variant in VARIANTS:
            plan = plan_for(cal, model, variant, args.budget, args.seq_len)
            apply_plan(model, cal, plan)
            flops = modify.flops(model, args.seq_len)
            routed = [i for i, c in enumerate(plan["capacities"]) if c < 1]
            r2 = [
                cal.candidates["r2"][i, plan["capacities"][i], plan["skip_paths"][i]]
                for i in routed
                if plan["skip_paths"][i] != "identity"
            ]
            row = {
                **plan,
                "routed": routed,
                "with_path": [i for i in routed if plan["skip_paths"][i] != "identity"],
                "model_flops_ratio": flops.ratio,
                "mean_r2": sum(r2) / len(r2) if r2 else None,
                "ppl": {k: perplexity(model, w) for k, w in held_out.items()},
            }
            row["vs_dense"] = {k: row["ppl"][k] / results["dense"][k] for k in held_out}
            modify.revert(model)
            rows[variant] = row
            print(
                f"{name:<11} {variant:<11} blocks {len(routed):>2} (path on {len(row['with_path']):>2}) "
                f"cost {plan['cost_ratio']:.3f} model {flops.ratio:.3f} "
                + "  ".join(f"{k} {row['ppl'][k]:8.2f} ({row['vs_dense'][k]:.2f}x)" for k in held_out),
                flush=True,
            )
        results["calibrations"][name] = {
            "seconds": seconds,
            "rows": rows,
            "ablations": ablations(model, cal, held_out, results["dense"], args),
            "sensitivity": cal.sensitivity,
        }
        (args.out / "RESULTS.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
