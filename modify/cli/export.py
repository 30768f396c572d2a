"""``modify export SRC OUT``: a plan that only removes blocks (capacity 0), written as an ordinary checkpoint with
fewer layers, which loads without modify (see :mod:`modify.removal`)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from modify.calibrate.calibration import apply_calibration
from modify.calibrate.plan_file import load_plan
from modify.cli.common import Progress, add_common_flags, emit_json, quiet_libraries
from modify.config import CONFIG_KEY, MoDConfig
from modify.errors import ModifyError, NotExportableError, UsageError
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

SRC is a converted checkpoint whose plan only removes blocks, or any source with --plan PLAN.json (a plan made
on that checkpoint: its files are checked against the plan's record). OUT holds an ordinary transformers
checkpoint of the same architecture with the removed layers deleted (num_hidden_layers, per-layer lists, fields
that give a layer's kind by its index, and each attention's layer index renumbered), without routers or plan:
AutoModelForCausalLM.from_pretrained(OUT) loads it without modify. Refused: a plan that routes a block at a
capacity in (0, 1), gives a removed block a skip path or removes every block, and a family whose config can't
describe the kept layers. SRC is never modified; OUT is written into a temporary directory beside it, reloaded
with transformers and checked against the converted model's logits, and renamed only then."""


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


#: Tokens of the probe that the written checkpoint, reloaded, must compute the converted model's logits on.
PROBE_TOKENS = 32
#: Largest difference of the reloaded logits from the converted model's, relative to their largest magnitude (at
#: least 1): the checkpoint holds the same weights and layers, so only rounding may differ. Measured on tiny
#: Llama, Qwen2-MoE, GraniteMoE and JetMoE: 0 in float32, one unit of bfloat16's 2^-8 (0.0039 at logits of 0.6)
#: in bfloat16; a layer reloaded as another kind was 0.13 to 0.58 away (issue 30).
_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _probe(model: torch.nn.Module) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(0, vocab, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        return model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()


def _check_reload(tmp: Path, out: Path, model: torch.nn.Module, probe: torch.Tensor, expected: torch.Tensor) -> None:
    """Load what was written into ``tmp`` as a user would (transformers alone) and compare: every weight read
    and nothing else, the converted model's logits on ``probe``. Raises NotExportableError; OUT is not made."""
    from transformers import AutoModelForCausalLM  # optional dependency, as in modify.io.checkpoint

    dtype = next(model.parameters()).dtype
    fix = "nothing was written; keep the converted checkpoint, which routes the blocks away without deleting them"
    try:
        again, report = AutoModelForCausalLM.from_pretrained(
            tmp, dtype=dtype, attn_implementation=model.config._attn_implementation, output_loading_info=True
        )
        got = _logits(again.eval(), probe)
    except (OSError, ValueError, RuntimeError, KeyError, AttributeError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise NotExportableError(f"{out} would not reload with transformers ({first}); {fix}") from None
    lost = [k for part in ("missing_keys", "unexpected_keys", "mismatched_keys") for k in report.get(part) or ()]
    if lost:
        raise NotExportableError(
            f"reloaded, {out} would leave {len(lost)} weights unread or randomly initialised ({lost[0]}, ...); {fix}"
        )
    scale = max(1.0, float(expected.abs().max()))
    difference = float((got - expected).abs().max())
    if not difference <= _TOLERANCE.get(dtype, 1e-5) * scale:
        raise NotExportableError(
            f"reloaded, {out} computes logits {difference:.3g} from the converted model's (largest {scale:.3g}); {fix}"
        )


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
        calibration, plan_source = load_plan(args.plan)
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
    if calibration is not None:
        problem = source.mismatch(plan_source)
        if problem:
            raise ModifyError(
                f"plan {args.plan} was made on {source_label(plan_source)}, not on {source.path} ({problem}); "
                f"export the checkpoint it was made on, or calibrate this one (modify calibrate {args.src} ...)"
            )
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
    probe = _probe(model)
    expected = _logits(model, probe)  # the converted model's: what the checkpoint must compute
    export_pruned(model)
    after = before - len(removed)
    with progress.step(f"saving {args.out}"), atomic_directory(args.out, args.force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_card(label, removed, before, after))
        with progress.step("reloading it with transformers"):
            _check_reload(tmp, args.out, model, probe, expected)
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
