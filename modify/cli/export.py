"""``modify export SRC OUT``: a plan that only removes blocks (capacity 0), written as an ordinary checkpoint with
fewer layers, which loads without modify (see :mod:`modify.removal`)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from modify.calibrate.calibration import apply_calibration
from modify.calibrate.plan_file import load_plan
from modify.cli.common import Progress, add_common_flags, emit_json, quiet_libraries
from modify.config import CONFIG_KEY, MoDConfig
from modify.errors import ModifyError, UsageError
from modify.io.checkpoint import (
    atomic_directory,
    check_output,
    is_converted_directory,
    load_source,
    resolve_source,
    source_label,
)
from modify.removal import check_removal_plan, export_pruned

EXAMPLES = """examples:
  modify calibrate smollm2 --data plays/*.txt --flops-budget 0.8 --removal only --out removal.json
  modify export smollm2 out/pruned --plan removal.json          # apply the removal-only plan and write it
  modify convert smollm2 out/removed --capacity 0 --layers 12-17 && modify export out/removed out/pruned
  modify export out/removed out/pruned --force --json          # replace OUT; print a JSON summary

SRC is a converted checkpoint whose plan only removes blocks, or any source with --plan PLAN.json. OUT holds an
ordinary transformers checkpoint of the same architecture with the removed layers deleted (num_hidden_layers,
layer_types and each attention's layer index renumbered), without routers or plan:
AutoModelForCausalLM.from_pretrained(OUT) loads it without modify. A plan that routes a block at a capacity in
(0, 1), or gives a removed block a skip path, is refused. SRC is never modified; OUT is written into a
temporary directory beside it and renamed when complete."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a removal-only plan as a plain checkpoint with fewer layers",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "src", metavar="SRC", help="converted directory, or with --plan: model directory, .gguf, id, smollm2"
    )
    p.add_argument("out", metavar="OUT", type=Path, help="directory to write (must not exist unless --force)")
    p.add_argument("--plan", type=Path, metavar="PLAN.json", help="a removal-only plan written by 'modify calibrate'")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: the checkpoint's)"
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    add_common_flags(p)
    p.set_defaults(run=run)


def _card(source: str, removed: list[int], before: int, after: int) -> str:
    return f"""---
library_name: transformers
tags: [layer-pruning, modify]
---
# {after}-layer model: {before - after} of {before} blocks removed

Exported with [modify](https://pypi.org/project/modify/) (`modify export`) from `{source}`: blocks
{", ".join(map(str, removed)) or "none"} of the original {before} were removed (static layer removal, as ShortGPT);
the rest are the original weights. It is an ordinary checkpoint of its architecture: no modify needed to load it.
"""


def run(args: argparse.Namespace) -> int:
    progress = Progress(args.quiet or args.json, args.debug)
    quiet_libraries(args.debug, progress.enabled)
    start = time.perf_counter()
    source = resolve_source(args.src)
    check_output(args.out, source, args.force)
    converted = is_converted_directory(source)
    calibration = None
    if converted and args.plan:
        raise UsageError(f"{source.path} is converted and carries its own plan; drop --plan or export its source")
    if args.plan:
        calibration, _ = load_plan(args.plan)
        plan = calibration.plan()
    elif not converted:
        raise ModifyError(
            f"{source.path} has no Mixture-of-Depths plan; give a removal-only plan with --plan PLAN.json "
            "(modify calibrate --removal only) or export a converted checkpoint"
        )
    else:
        try:
            plan = MoDConfig.from_dict(json.loads((source.path / "config.json").read_text())[CONFIG_KEY])
        except (TypeError, ValueError) as exc:
            raise ModifyError(f"{source.path}'s plan in config.json is not valid ({exc}); convert it again") from None
    check_removal_plan(plan)  # before loading any weights
    with progress.step(f"loading {source.path.name}"):
        model, tokenizer = load_source(source, args.dtype)
    if calibration is not None:
        with progress.step("applying the plan"):
            try:
                apply_calibration(model, calibration)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
    label = source_label(plan.source) if plan.source else source.path.name
    before = plan.num_blocks
    removed = plan.removed
    export_pruned(model)
    after = before - len(removed)
    with progress.step(f"saving {args.out}"), atomic_directory(args.out, args.force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_card(label, removed, before, after))
    out = args.out.expanduser().resolve()
    seconds = time.perf_counter() - start
    if args.json:
        emit_json(
            {
                "out": str(out),
                "removed": removed,
                "layers": after,
                "source_layers": before,
                "seconds": round(seconds, 2),
            }
        )
    elif not args.quiet:
        print(f"wrote {out}: {after} of {before} layers kept, blocks {removed or 'none'} removed ({seconds:.1f} s)")
    return 0
