"""``modify inspect SRC_OR_OUT``: the blocks of a checkpoint, how they would be or are routed, and their FLOPs."""

from __future__ import annotations

import argparse

import modify
from modify.cli.common import Progress, add_common_flags, emit_json, quiet_libraries
from modify.errors import UsageError
from modify.io.checkpoint import load_any

EXAMPLES = """examples:
  modify inspect smollm2                        # a source: every block, its form, FLOPs if dense
  modify inspect out/smollm2-mod                # a converted checkpoint: routed blocks and capacities
  modify inspect out/smollm2-mod --seq-len 512 --json | jq .flops"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="show the block table of a source or converted checkpoint",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "src", metavar="SRC_OR_OUT", help="model directory, .gguf file, cached model id, 'smollm2', or a converted OUT"
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=2048,  # modify.io.checkpoint.CARD_SEQ_LEN, not imported: --help stays fast
        help="sequence length for the FLOPs (default 2048, the length convert's summary and the model card report; "
        "eval, train and calibrate default to 512, bench to 1024)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_common_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.seq_len < 1:
        raise UsageError(f"--seq-len {args.seq_len} must be at least 1")
    progress = Progress(args.quiet or args.json, args.debug)
    quiet_libraries(args.debug, progress.enabled)
    with progress.step(f"loading {args.src}"):
        model, _, source, converted = load_any(args.src)
    with progress.step("tracing blocks"):
        blocks = modify.find_blocks(model, strict=False)
    count = modify.flops(model, args.seq_len)
    rows = [
        {
            "index": b.index,
            "name": b.name,
            "form": b.form,
            "delta": b.delta,
            "routed": b.routed,
            "capacity": b.capacity,
            "skip_path": b.skip_path,
            "kv": b.kv,
            "flops_dense": dense,
            "flops_routed": routed,
            **({"reason": b.reason} if b.reason else {}),
        }
        for b, (dense, routed) in zip(blocks, count.blocks)
    ]
    unroutable = [{"index": b.index, "name": b.name, "reason": b.reason} for b in blocks if b.reason]
    if args.json:
        emit_json(
            {
                "source": str(source.path),
                "converted": converted,
                "mode": getattr(model.config, "mixture_of_depths", {}).get("mode") if converted else None,
                "seq_len": args.seq_len,
                "blocks": rows,
                "unroutable": unroutable,
                "flops": {"dense": count.dense, "routed": count.routed, "ratio": round(count.ratio, 6)},
            }
        )
        return 0
    print(f"{source.path} ({'converted' if converted else 'source'}), forward FLOPs at {args.seq_len} tokens")
    print(
        f"{'block':>5}  {'name':<24} {'form':<11} {'routed':<8} {'skip path':<11} {'kv':<6} "
        f"{'dense':>12} {'routed':>12}"
    )
    for r in rows:
        capacity = ("removed" if r["capacity"] == 0 else f"{r['capacity']:g}") if r["routed"] else "-"
        print(
            f"{r['index']:>5}  {r['name']:<24} {r['form']:<11} {capacity:<8} {r['skip_path'] or '-':<11} "
            f"{r['kv'] or '-':<6} {r['flops_dense']:>12.4g} {r['flops_routed']:>12.4g}"
        )
    print(f"total (with embeddings and head): dense {count.dense:.4g}, routed {count.routed:.4g} ({count.ratio:.1%})")
    for u in unroutable:
        print(f"block {u['index']} ({u['name']}) can't be routed: {u['reason']}")
    return 0
