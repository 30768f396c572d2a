"""``modify convert SRC OUT``: convert a checkpoint to Mixture-of-Depths and save it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import modify
from modify.api import parse_layers
from modify.calibrate.calibration import apply_calibration
from modify.calibrate.plan_file import load_plan
from modify.cli.calibrate import (
    add_calibration_flags,
    add_kv_flag,
    add_skip_flags,
    calibration_settings,
    run_calibration,
    skip_spec,
)
from modify.cli.common import Progress, add_common_flags, capacity_type, emit_json, quiet_libraries
from modify.config import CAUSAL_RULES, MODES
from modify.errors import ModifyError, UsageError
from modify.io.checkpoint import check_output, is_converted_directory, load_source, resolve_source, save_converted

EXAMPLES = """examples:
  modify convert smollm2 out/smollm2-mod                     # the default real checkpoint, the paper's plan
  modify convert ./my-llama out/llama-mod --capacity 0.25 --layers 4-20
  modify convert model.gguf out/mod --layers 1,3,5 --dtype bfloat16
  modify convert HuggingFaceTB/SmolLM2-135M out/mod          # a model id already in the local HF cache
  modify convert ./my-llama out/llama-mod --force --json     # replace OUT; print a JSON summary
  modify convert smollm2 out/mod --calibrate plays/*.txt --flops-budget 0.75   # plan and routers from data
  modify convert smollm2 out/mod --plan plan.json             # a plan written by 'modify calibrate'
  modify convert smollm2 out/mod --calibrate plays/*.txt --flops-budget 0.75 --skip-path linear --skip-rank 128
  modify convert smollm2 out/mod --plan plan.json --causal predictor   # sample with a trained predictor
  modify convert ./my-mixtral out/mode --mode integrated --capacity 0.5   # MoDE: a no-op expert per MoE layer
  modify convert ./my-llama out/removed --capacity 0 --layers 12-17   # remove blocks 12-17 (no token runs them)
  modify convert smollm2 out/mod --calibrate plays/*.txt --flops-budget 0.8 --removal only   # ShortGPT-style
  modify convert smollm2 out/mod --capacity 0.5 --layers 4-27 --kv all   # skipped tokens keep their keys/values
  modify convert smollm2 out/mod --calibrate plays/*.txt --flops-budget 0.8 --kv both   # planner picks kv per block

SRC is a Hugging Face model directory (safetensors, sharded or not, or .bin), a .gguf file, a model id in the
local Hugging Face cache (nothing is downloaded) or 'smollm2'. SRC is never modified; OUT is written into a
temporary directory beside it and renamed when complete."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint to Mixture-of-Depths",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="model directory, .gguf file, cached model id, or 'smollm2'")
    p.add_argument("out", metavar="OUT", type=Path, help="directory to write (must not exist unless --force)")
    p.add_argument(
        "--capacity",
        type=capacity_type,
        default=0.125,
        help="fraction of tokens routed, in [0, 1]; 0 removes the blocks (default 0.125)",
    )
    p.add_argument("--layers", default="every-other", help="every-other (default), all, 1,3,5 or 4-20")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: the checkpoint's)"
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--plan", type=Path, metavar="PLAN.json", help="apply a plan written by 'modify calibrate'")
    source.add_argument(
        "--calibrate", dest="data", nargs="+", type=Path, metavar="FILE", help="calibrate on these text files first"
    )
    add_calibration_flags(p, required=False)
    add_skip_flags(p, fitted=False)
    p.add_argument(
        "--causal",
        choices=CAUSAL_RULES,
        help="how each token decides alone when sampling: the router score against a threshold fitted by "
        "calibration (threshold, the default), the router trained with an auxiliary loss (aux), or a small "
        "trained predictor (predictor); aux and predictor need training ('modify train')",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="staged",
        help="on Mixture-of-Experts models: a router in front of each routed block (staged, the default) or a "
        "no-op expert in each routed block's expert router, --capacity of the tokens dispatched (integrated)",
    )
    add_kv_flag(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    add_common_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    layers = parse_layers(args.layers)
    skip = skip_spec(args)
    if args.plan and skip != "identity":
        raise UsageError("--skip-path comes from the plan with --plan; calibrate with --skip-path instead")
    if args.kv and args.plan:
        raise UsageError("--kv comes from the plan with --plan; calibrate with --kv instead")
    if args.kv == "both" and not args.data:
        raise UsageError("--kv both lets calibration choose per block; add --calibrate FILES, or give routed or all")
    if args.mode == "integrated" and (args.plan or args.data or skip != "identity" or args.kv):
        raise UsageError("--mode integrated takes --capacity and --layers; calibration and skip paths are staged only")
    if args.data and args.flops_budget is None:
        raise UsageError("--calibrate needs --flops-budget F, e.g. --flops-budget 0.75")
    if args.data:
        calibration_settings(args)  # flags that can't go together: refused before anything loads
    progress = Progress(args.quiet or args.json, args.debug)
    quiet_libraries(args.debug, progress.enabled)
    start = time.perf_counter()
    source = resolve_source(args.src)
    check_output(args.out, source, args.force)
    if is_converted_directory(source):
        raise ModifyError(
            f"{source.path} is already converted (its config.json has a Mixture-of-Depths plan); "
            "convert its source instead"
        )
    with progress.step(f"loading {source.path.name}"):
        model, tokenizer = load_source(source, args.dtype)
    calibration = None
    if args.plan:
        calibration, _ = load_plan(args.plan)
    elif args.data:
        calibration = run_calibration(args, model, tokenizer, progress)
    with progress.step("tracing blocks and inserting routers"):
        try:
            if calibration is not None:
                apply_calibration(model, calibration, causal=args.causal)
            else:
                modify.convert(
                    model,
                    capacity=args.capacity,
                    layers=layers,
                    skip_path=skip,
                    causal=args.causal,
                    mode=args.mode,
                    kv=args.kv or "routed",
                )
        except ValueError as exc:
            if isinstance(exc, modify.UnsupportedModelError):
                raise
            raise UsageError(str(exc)) from None
    with progress.step(f"saving {args.out}"):
        out = save_converted(model, tokenizer, args.out, source, args.force)
    seconds = time.perf_counter() - start
    plan = model.config.mixture_of_depths
    count = modify.flops(model, 2048)
    if args.json:
        emit_json(
            {
                "out": str(out),
                "source": plan["source"],
                "routed": plan["routed"],
                "capacities": plan["capacities"],
                "skip_paths": plan["skip_paths"],
                "kv": plan["kv"],
                "mode": plan["mode"],
                "flops": {"seq_len": 2048, "dense": count.dense, "routed": count.routed},
                "seconds": round(seconds, 2),
            }
        )
    elif not args.quiet:
        removed = plan["capacities"].count(0.0)
        print(
            f"wrote {out}: {len(plan['routed'])} of {plan['num_blocks']} blocks routed"
            + (f" ({removed} removed)" if removed else "")
            + f", forward FLOPs at 2048 tokens {count.ratio:.1%} of dense ({seconds:.1f} s)"
        )
    return 0
