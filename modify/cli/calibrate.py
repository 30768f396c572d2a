"""``modify calibrate SRC --data FILES --flops-budget F --out PLAN.json``: choose blocks, capacities and
initial routers from calibration text (see :mod:`modify.calibrate.calibration`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from modify.calibrate.calibration import IMPORTANCE_KINDS, CalibrationSettings, calibrate, token_windows
from modify.calibrate.plan_file import save_plan
from modify.calibrate.planning import REMOVAL_MODES
from modify.cli.common import Parser, Progress, add_common_flags, emit_json, quiet_libraries
from modify.errors import ModifyError, UsageError
from modify.io.checkpoint import check_parent, load_source, resolve_source
from modify.routing.skip_path import SKIP_KINDS, spec_name

EXAMPLES = """examples:
  modify calibrate smollm2 --data plays/*.txt --flops-budget 0.75 --out plan.json
  modify calibrate ./my-llama --data corpus.txt --tokens 131072 --seq-len 1024 --flops-budget 0.6 --out plan.json
  modify convert ./my-llama out/llama-mod --plan plan.json        # apply a saved plan
  modify convert smollm2 out/mod --calibrate plays/*.txt --flops-budget 0.75   # calibrate and convert at once
  modify calibrate smollm2 --data plays/*.txt --flops-budget 0.75 --skip-path linear --skip-rank 128 --out plan.json
  modify calibrate smollm2 --data plays/*.txt --flops-budget 0.8 --removal only --out removal.json   # ShortGPT-style
  modify convert smollm2 out/removed --plan removal.json && modify export out/removed out/pruned   # fewer layers
  modify calibrate smollm2 --data plays/*.txt --flops-budget 0.75 --importance grad --out plan.json  # loss-based
  modify calibrate smollm2 --data plays/*.txt --flops-budget 0.8 --kv both --out plan.json   # kv chosen per block

Writes PLAN.json, the fitted routers as PLAN.safetensors and a chart as PLAN.png beside it."""


def budget_type(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget {text!r} is not a number; use a value in (0, 1), e.g. 0.75") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(
            f"budget {text} is out of range; use a value in (0, 1), e.g. 0.75 (1 routes nothing)"
        )
    return value


def grid_type(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid {text!r} is not a list of numbers like 1,0.5,0.25") from None
    if any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"grid {text} holds a capacity outside [0, 1]")
    return tuple(sorted(set(values) | {1.0}, reverse=True))


def add_skip_flags(p: argparse.ArgumentParser, fitted: bool) -> None:
    """--skip-path and --skip-rank, shared by calibrate and convert."""
    p.add_argument(
        "--skip-path",
        choices=list(SKIP_KINDS),
        default="identity",
        help=(
            "what routed blocks give the tokens they skip: nothing (identity, the default, the paper's rule), "
            "a low-rank linear estimate of the block's contribution, or a small MLP"
            + (
                "; fitted here, and the planner chooses per block between it and identity under the budget"
                if fitted
                else "; starts at zero (fit it with --calibrate, or train it)"
            )
        ),
    )
    p.add_argument(
        "--skip-rank", type=int, default=32, help="rank of a linear skip path, hidden units of an mlp (default 32)"
    )


def skip_spec(args: argparse.Namespace) -> str:
    """The skip-path spec the flags ask for ("identity", "linear-32", ...); a bad rank is a one-line error."""
    try:
        return spec_name(args.skip_path, args.skip_rank)
    except ValueError as exc:
        raise UsageError(f"--skip-rank {args.skip_rank}: {exc}") from None


#: ``--kv``: the kv options the planner measures and chooses among.
KV_CANDIDATES = {"routed": ("routed",), "all": ("all",), "both": ("routed", "all")}


def add_kv_flag(p: Parser) -> None:
    """--kv, shared by calibrate and convert."""
    p.add_argument(
        "--kv",
        choices=tuple(KV_CANDIDATES),
        help="what a routed block's skipped tokens leave in its attention: nothing (routed, the paper's rule and "
        "the default) or their keys and values, so routed tokens attend to every token (all); with calibration "
        "also both, the planner measuring each and choosing per block",
    )


def add_calibration_flags(p: Parser, required: bool) -> None:
    """The calibration settings, shared by calibrate and convert; with ``required`` False (convert, where
    calibration is optional) they are refused unless ``--calibrate`` is given, instead of silently ignored."""
    d = CalibrationSettings()  # the flags' defaults are the library's
    added: list[argparse.Action] = []

    def flag(*names: str, **kwargs: Any) -> None:
        added.append(p.add_argument(*names, **kwargs))

    flag("--flops-budget", type=budget_type, required=required, help="blocks cost at most F x dense FLOPs, F in (0, 1)")
    flag("--tokens", type=int, default=d.tokens, help=f"calibration tokens (default {d.tokens})")
    flag(
        "--seq-len",
        type=int,
        default=d.seq_len,
        help=f"tokens per window; the budget holds at this length (default {d.seq_len}, as train's and eval's)",
    )
    flag(
        "--grid",
        type=grid_type,
        default=d.grid,
        help=f"capacities to choose from (default {','.join(f'{c:g}' for c in d.grid)})",
    )
    flag(
        "--sensitivity-tokens",
        type=int,
        default=d.sensitivity_tokens,
        help=f"tokens for the per-block measurements (default {d.sensitivity_tokens})",
    )
    flag("--seed", type=int, default=d.seed, help=f"picks the sensitivity windows (default {d.seed})")
    flag(
        "--keep-first",
        type=int,
        default=d.keep_first,
        help=f"leading tokens always routed: the attention sink (default {d.keep_first})",
    )
    flag(
        "--refine-rounds",
        type=int,
        default=d.refine_rounds,
        help=f"re-measure around the plan and plan again this many times (default {d.refine_rounds})",
    )
    flag(
        "--removal",
        choices=REMOVAL_MODES,
        default=d.removal,
        help="removing a block (capacity 0, no FLOPs) as one option beside routing and skip paths (allow, the "
        "default), as the only one: each block kept or removed, a plan 'modify export' writes with fewer layers "
        "(only), or not at all (never)",
    )
    flag(
        "--importance",
        choices=IMPORTANCE_KINDS,
        default=d.importance,
        help="a token's importance, which routers are fitted to: log of how much the block changes it (norm, the "
        "default) or the first-order loss increase if the block skipped it, from a dense backward (grad)",
    )
    flag(
        "--calibration-dtype",
        default=d.dtype,
        choices=["bfloat16", "float32", "float16"],
        help=f"weights dtype of the model copy that calibration runs (default {d.dtype})",
    )
    if not required:
        _only_with_calibrate(p, added)


def _only_with_calibrate(p: Parser, actions: list[argparse.Action]) -> None:
    """Parse ``actions`` as None in convert, so that one given without ``--calibrate`` (dest ``data``) shows and
    is a usage error; with ``--calibrate``, the ones not given get their defaults back."""
    defaults = {a.dest: a.default for a in actions}
    for action in actions:
        action.default = None
        action.help = f"with --calibrate: {action.help}"

    def check(parser: Parser, args: argparse.Namespace) -> None:
        given = [a.option_strings[0] for a in actions if getattr(args, a.dest) is not None]
        if given and args.data is None:
            several = len(given) > 1
            parser.error(
                f"{', '.join(given)}: calibration setting{'s' * several}, used only with --calibrate FILE...; "
                f"add --calibrate or drop {'them' if several else 'it'}"
            )
        for dest, value in defaults.items():
            if getattr(args, dest) is None:
                setattr(args, dest, value)

    p.checks.append(check)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="plan capacities under a FLOP budget and fit routers on calibration text",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="model directory, .gguf file, cached model id, or 'smollm2'")
    p.add_argument(
        "--data", nargs="+", type=Path, required=True, metavar="FILE", help="UTF-8 text files, read in order"
    )
    p.add_argument("--out", type=Path, required=True, metavar="PLAN.json", help="where to write the plan")
    add_calibration_flags(p, required=True)
    add_skip_flags(p, fitted=True)
    add_kv_flag(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    add_common_flags(p)
    p.set_defaults(run=run)


def calibration_settings(args: argparse.Namespace) -> Any:
    """The settings the flags ask for; a combination they refuse is a usage error (checked before loading)."""
    try:
        return CalibrationSettings(
            tokens=args.tokens,
            seq_len=args.seq_len,
            budget=args.flops_budget,
            grid=args.grid,
            sensitivity_tokens=args.sensitivity_tokens,
            seed=args.seed,
            keep_first=args.keep_first,
            dtype=args.calibration_dtype,
            refine_rounds=args.refine_rounds,
            skip_paths=(skip_spec(args),),
            removal=args.removal,
            importance=args.importance,
            kv=KV_CANDIDATES[args.kv or "routed"],
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def run_calibration(args: argparse.Namespace, model: Any, tokenizer: Any, progress: Progress) -> Any:
    """Calibrate ``model`` as the flags say; shared with ``modify convert --calibrate``."""
    missing = [str(p) for p in args.data if not p.is_file()]
    if missing:
        raise ModifyError(f"calibration data {missing[0]} is not a file; give UTF-8 text files to --data")
    if tokenizer is None:
        raise ModifyError("SRC has no tokenizer to read the calibration text with; save one beside the model")
    settings = calibration_settings(args)
    with progress.step("reading calibration text"):
        try:
            windows, data = token_windows(tokenizer, args.data, args.seq_len, args.tokens)
        except ValueError as exc:
            raise ModifyError(str(exc)) from None
    bar = progress.bar()
    try:
        return calibrate(model, windows, data, settings, progress=bar)
    except ValueError as exc:  # the planner's degenerate budgets
        raise UsageError(str(exc)) from None
    finally:
        bar.close()


def run(args: argparse.Namespace) -> int:
    progress = Progress(args.quiet or args.json, args.debug)
    quiet_libraries(args.debug, progress.enabled)
    start = time.perf_counter()
    calibration_settings(args)  # flags that can't go together: refused before anything loads
    source = resolve_source(args.src)
    check_parent(args.out.expanduser().resolve())  # before minutes of calibration, not after
    with progress.step(f"loading {source.path.name}"):
        model, tokenizer = load_source(source)
    calibration = run_calibration(args, model, tokenizer, progress)
    path = save_plan(calibration, args.out, source.to_dict())
    summary = {
        "plan": str(path),
        "routed": calibration.routed,
        "capacities": [calibration.capacities[i] for i in calibration.routed],
        "skip_paths": [calibration.skip_paths[i] for i in calibration.routed],
        "kv": [calibration.kv[i] if calibration.kv else "routed" for i in calibration.routed],
        "cost_ratio": calibration.cost_ratio,
        "predicted_loss_increase": calibration.predicted_loss_increase,
        "measured_loss_increase": calibration.measured_loss - calibration.dense_loss,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if args.json:
        emit_json(summary)
    elif not args.quiet:
        routed = ", ".join(
            f"{i}:{c:g}" + (" (removed)" if c == 0 else "") + (f" ({p})" if p != "identity" else "")
            + (" kv-all" if kv == "all" else "")
            for i, c, p, kv in zip(summary["routed"], summary["capacities"], summary["skip_paths"], summary["kv"])
        )
        print(
            f"wrote {path} (+ .safetensors, .png): blocks {routed}; {calibration.cost_ratio:.3f} of dense block FLOPs; "
            f"loss {summary['predicted_loss_increase']:+.3f} predicted, "
            f"{summary['measured_loss_increase']:+.3f} measured "
            f"({summary['seconds']:.0f} s)"
        )
    return 0
