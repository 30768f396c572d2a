"""``modify bench MODEL``: wall-clock, FLOPs and memory of converted models against the dense model and the usual
implementations, forward and training step, in one process.

MODEL is a named shape with random weights (smollm2-135m, llama-1b, llama-7b; --depth to keep fewer blocks),
a converted directory (its own plan is "saved") or any source ``modify convert`` accepts (converted on the
fly). For each batch size, sequence length and --measure (forward, training step) it times, interleaved and
repeated, the dense model and, per plan, the converted model, a masked baseline (every token through every
block, the update masked) and a per-sample baseline (a Python loop over the batch with boolean indexing).
Reported per variant: median time, speedup over dense, analytic and measured FLOPs and their ratio (the speed
limit), the converted model's routing share (profiler) and peak memory. CPU runs the PyTorch path; CUDA the
Triton kernels. --kv all runs the plans with skipped tokens' keys and values kept (kv="all"); --kv all routed
runs each plan both ways.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

import modify
from modify.api import routed_blocks
from modify.cli.common import add_common_flags, quiet_libraries
from modify.errors import UsageError
from modify.io.checkpoint import atomic_file, load_any
from modify.routing.kv_all import KV_OPTIONS

if TYPE_CHECKING:
    from modify.bench.measure import BenchSettings
    from modify.bench.models import BenchPlan

EXAMPLES = """examples:
  modify bench smollm2-135m --seq-len 512 1024 2048 --batch-size 1 4 16 --plans paper all@0.125 --json > bench.json
  modify bench smollm2-135m --plans all@0.5 all@0.25 --measure forward --implementations dense converted
  modify bench smollm2 --seq-len 512 --plans all@0.125 --kv all routed --implementations dense converted
  modify bench llama-7b --depth 4 --seq-len 2048 --batch-size 1 --dtype bfloat16     # on a GPU: Triton path
  modify bench out/smollm2-mod --plans saved paper --csv bench.csv --plot bench.png   # a converted model
  modify bench smollm2-135m --compile --seq-len 1024 --batch-size 4                   # torch.compile too"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time converted models against dense and the usual implementations (forward and training step)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="a named shape (smollm2-135m, llama-1b, llama-7b) or a model")
    p.add_argument(
        "--seq-len", type=int, nargs="+", default=[1024], metavar="T",
        help="sequence lengths (default 1024: a timing length, the middle of docs/benchmarks.md's 512-2048 sweep; "
        "eval, train and calibrate default to 512)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, nargs="+", default=[4], metavar="B", help="batch sizes (4)")
    p.add_argument(
        "--plans", nargs="+", default=None, metavar="PLAN",
        help="paper, LAYERS@CAPACITY (all@0.125, every-other@0.5, 1,3,5@0.25), saved, or a PLAN.json "
        "(default: saved for a converted MODEL, else paper and all@0.125)",
    )  # fmt: skip
    p.add_argument(
        "--kv", nargs="+", choices=KV_OPTIONS, metavar="KV",
        help="what each plan's skipped tokens leave in attention: routed (nothing, the paper's rule) or all (their "
        "keys and values); several run each plan once per option, labelled PLAN+kv=all (default: the plan's own, "
        "routed for paper and LAYERS@CAPACITY)",
    )  # fmt: skip
    # Not --mode: that is convert's Mixture-of-Depths mode (staged or integrated).
    p.add_argument(
        "--measure", choices=["forward", "train", "both"], default="both",
        help="what to time: the forward, the training step or both (default both)",
    )  # fmt: skip
    p.add_argument(
        "--implementations", nargs="+", default=["dense", "converted", "masked", "per-sample"],
        choices=["dense", "converted", "masked", "per-sample"], help="what to compare (all four)",
    )  # fmt: skip
    p.add_argument("--compile", action="store_true", help="also time dense and converted under torch.compile")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up (3); the median is reported")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)"
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--depth", type=int, help="blocks of a named shape (default: the real model's)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    p.add_argument(
        "--memory-budget", type=float, metavar="GIB",
        help="skip settings projected above this many GiB (default: 85%% of available memory)",
    )  # fmt: skip
    p.add_argument("--no-profile", action="store_true", help="skip the profiler run that measures the routing share")
    p.add_argument(
        "--profile-dense", action="store_true",
        help="also profile the dense step: time in the plan's blocks against the converted model's (where time goes)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the records and the summary as JSON on stdout")
    p.add_argument("--csv", type=Path, metavar="FILE", help="write one CSV row per variant and setting")
    p.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG of speedup against capacity")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="write the per-setting tables as Markdown")
    add_common_flags(p)
    p.set_defaults(run=run)


def _check_args(args: argparse.Namespace) -> None:
    for flag, values in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size)):
        bad = [v for v in values if v < 1]
        if bad:
            raise UsageError(f"{flag} {bad[0]} must be at least 1")
    if args.repeats < 1:
        raise UsageError(f"--repeats {args.repeats} must be at least 1")
    if args.depth is not None and args.depth < 1:
        raise UsageError(f"--depth {args.depth} must be at least 1")
    if "dense" not in args.implementations:
        raise UsageError("--implementations must include dense: every speedup is over it")
    for out in (args.csv, args.plot, args.markdown):
        if out is not None and not out.parent.exists():
            raise UsageError(f"{out.parent} does not exist; create it or write {out.name} elsewhere")


def _load(args: argparse.Namespace, torch_dtype: Any) -> tuple[nn.Module, bool]:
    """(model, converted) from a named shape or a source."""
    # import time: modify.bench (the timing harness, transformers' Llama modeling) loads only when bench runs
    from modify.bench.models import SHAPES, build_shape

    if args.model in SHAPES:
        return build_shape(args.model, args.depth, torch_dtype), False
    if args.depth is not None:
        raise UsageError(f"--depth applies to named shapes ({', '.join(SHAPES)}), not to {args.model}")
    model, _, _, converted = load_any(args.model, str(torch_dtype).removeprefix("torch."))
    return model, converted


def _plan_texts(args: argparse.Namespace, converted: bool) -> list[str]:
    return args.plans or (["saved"] if converted else ["paper", "all@0.125"])


def run(args: argparse.Namespace) -> int:
    # import time: modify.bench (the timing harness, transformers' Llama modeling) and psutil load only when bench runs
    import psutil

    from modify.bench.measure import MODES, BenchSettings
    from modify.bench.models import SHAPES, parse_plan, randomize_routers, saved_plan, with_kv
    from modify.bench.report import environment, markdown, plot, summary, table, write_csv

    _check_args(args)
    quiet_libraries(args.debug, False)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible; drop --device to run on the CPU")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model in SHAPES:  # plans checked before a large model is built
        blocks = args.depth or SHAPES[args.model]["num_hidden_layers"]
        plans = [parse_plan(text, blocks) for text in _plan_texts(args, False)]
    model, converted = _load(args, dtype)
    model = model.to(device)
    if args.model not in SHAPES:
        saved = saved_plan(model) if converted else None
        blocks = saved["num_blocks"] if saved is not None else len(modify.find_blocks(model, strict=False))
        plans = [parse_plan(text, blocks, saved) for text in _plan_texts(args, converted)]
    if args.kv:
        plans = [with_kv(plan, option) for plan in plans for option in dict.fromkeys(args.kv)]
    wanted = sorted({i for plan in plans for i in plan.capacities})
    kv_all = {i for plan in plans for i in plan.capacities if plan.kv_of(i) == "all"}
    states = [state for _, state in routed_blocks(model)] if converted else []
    split = {s.index for s in states if s.program.attention is not None}  # blocks converted with kv="all"
    if not set(wanted) <= {s.index for s in states} or not kv_all <= split:
        if converted:
            modify.revert(model)
        modify.convert(model, capacity=1.0, layers=wanted, kv=["all" if i in kv_all else "routed" for i in wanted])
        randomize_routers(model)
    budget = args.memory_budget * 2**30 if args.memory_budget else 0.85 * psutil.virtual_memory().available
    if device.type == "cuda" and not args.memory_budget:
        budget = 0.85 * torch.cuda.mem_get_info(device)[0]
    settings = BenchSettings(
        batch_sizes=args.batch_size, seq_lens=args.seq_len,
        modes=MODES if args.measure == "both" else (args.measure,), implementations=tuple(args.implementations),
        repeats=args.repeats, compile=args.compile, profile=not args.no_profile, profile_dense=args.profile_dense,
        memory_budget=int(budget),
    )  # fmt: skip
    env = environment(device, dtype)
    records = _run_with_progress(model, plans, settings, quiet=args.quiet or not sys.stderr.isatty())
    if args.csv is not None:
        write_csv(args.csv, args.model, records, env)
    if args.plot is not None:
        plot(args.plot, args.model, records)
    if args.markdown is not None:
        atomic_file(args.markdown, lambda tmp: tmp.write_text(markdown(records, env) + "\n"))
    result = {
        "model": args.model,
        "environment": env,
        "plans": {p.label: p.describe() for p in plans},
        "summary": summary(records),
        "skipped": [{k: r[k] for k in ("mode", "batch_size", "seq_len", "skipped")} for r in records if "skipped" in r],
        "records": records,
    }
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        print(table(records))
        print(f"{env['device']} · {env['dtype']} · torch {env['torch']} · transformers {env['transformers']}")
    return 0


def _run_with_progress(
    model: nn.Module, plans: list[BenchPlan], settings: BenchSettings, quiet: bool
) -> list[dict[str, Any]]:
    # import time: modify.bench (the timing harness, transformers' Llama modeling) loads only when bench runs
    from modify.bench.measure import planned_calls, run_bench

    if quiet:
        return run_bench(model, plans, settings)
    total = planned_calls(plans, settings)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("benchmarking", total=total)
        settings.on_progress = lambda text, n: bar.update(task, description=text, advance=n)
        return run_bench(model, plans, settings)
