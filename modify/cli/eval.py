"""``modify eval MODEL --data FILES``: held-out perplexity, throughput and FLOPs per token of a model.

MODEL is a directory written by ``modify convert`` (evaluated routed, as trained) or any source ``modify
convert`` accepts (evaluated dense). The text is tokenized with MODEL's tokenizer and packed into sequences
of ``--seq-len`` tokens, read once in order; the loss is the mean next-token cross entropy over every
predicted token (see :mod:`modify.train.evaluate`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path

import modify
from modify.cli.common import Progress, add_common_flags, emit_json, quiet_libraries
from modify.errors import ModifyError, UnsupportedModelError, UsageError
from modify.io.checkpoint import load_any
from modify.train.data import PackedStream, collect_files
from modify.train.evaluate import evaluate

EXAMPLES = """examples:
  modify eval out/smollm2-mod --data plays/m*.txt              # perplexity of a converted checkpoint
  modify eval smollm2 --data plays/m*.txt --max-tokens 8192     # the dense source on the same text
  modify eval out/smollm2-mod --data heldout/ --seq-len 1024 --batch-size 2 --dtype bfloat16
  modify eval out/smollm2-mod --data heldout.txt --json | jq .ppl
  modify eval out/smollm2-mod --data plays/m*.txt --routing causal   # each token decides alone, as when sampling

--data takes text files or directories of them. The sequences are read once, in order."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, tokens/s and FLOPs per token of a model on held-out text",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model", metavar="MODEL", help="a converted OUT, model directory, .gguf file, cached model id, or 'smollm2'"
    )
    p.add_argument(
        "--data", nargs="+", type=Path, required=True, metavar="PATH", help="UTF-8 text files or directories"
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=512,
        help="tokens per sequence, at least 2 (default 512, train's and calibrate's default, so that perplexities "
        "compare; inspect reports FLOPs at 2048, the model card's length)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    p.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens (default: all the data)")
    p.add_argument(
        "--routing",
        choices=["topk", "causal"],
        default="topk",
        help="how routed blocks choose tokens: topk over each sequence (the training rule, default) or causal, "
        "each token deciding alone as when sampling (the plan's causal rule)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="weights dtype (default: the checkpoint's); routers stay float32",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_common_flags(p)
    p.set_defaults(run=run)


def _check_args(args: argparse.Namespace) -> None:
    if args.seq_len < 2:
        raise UsageError(f"--seq-len {args.seq_len} must be at least 2 (each token predicts the next)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size} must be at least 1")
    if args.max_tokens is not None and args.max_tokens < args.seq_len:
        raise UsageError(
            f"--max-tokens {args.max_tokens} is less than one sequence of --seq-len {args.seq_len}; raise it"
        )


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    progress = Progress(args.quiet or args.json, args.debug)
    quiet_libraries(args.debug, progress.enabled)
    files = collect_files(args.data)
    with progress.step(f"loading {args.model}"):
        model, tokenizer, source, converted = load_any(args.model, args.dtype)
    if tokenizer is None:
        raise ModifyError(
            f"{source.path} has no tokenizer to read --data with; save one beside the model (tokenizer.save_pretrained)"
        )
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if positions and args.seq_len > positions:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the model's {positions} positions; use at most {positions}")
    with progress.step("reading --data"):
        stream = PackedStream(files, tokenizer, args.seq_len, loop=False, shuffle=False)
    sequences = args.max_tokens // args.seq_len if args.max_tokens is not None else None
    if args.routing == "causal" and not converted:
        raise UsageError(f"--routing causal needs a converted model; {source.path} is dense (drop --routing)")
    rule = modify.routing_mode(model, args.routing) if converted else contextlib.nullcontext()
    with progress.step(f"evaluating on {len(files)} file(s)"), rule:
        result = evaluate(model, stream.batches(args.batch_size, drop_last=False, limit=sequences))
    if result.tokens == 0:
        raise ModifyError(
            f"--data holds fewer than {args.seq_len} tokens: not one sequence to evaluate; "
            "give more text or a smaller --seq-len"
        )
    try:
        dense = modify.flops(model, args.seq_len).dense / args.seq_len
    except UnsupportedModelError:  # a model evaluate() could run but whose blocks modify can't count
        dense = math.nan
    summary = {
        "model": str(source.path),
        "converted": converted,
        "routing": args.routing,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "data": [str(f) for f in files],
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "loss": result.loss,
        "ppl": result.ppl,
        "tokens": result.tokens,
        "predicted_tokens": result.predicted_tokens,
        "seconds": round(result.seconds, 3),
        "tokens_per_second": result.tokens_per_second,
        "flops_per_token": result.flops_per_token,
        "flops_per_token_dense": dense,
    }
    if args.json:
        emit_json(summary)
        return 0
    ratio = f" ({result.flops_per_token / dense:.1%} of dense)" if converted and math.isfinite(dense) else ""
    print(
        f"perplexity {result.ppl:.3f} (loss {result.loss:.4f}) on {result.tokens:,} tokens in {result.seconds:.1f} s: "
        f"{result.tokens_per_second:,.0f} tokens/s, {result.flops_per_token:.4g} FLOPs/token{ratio}"
    )
    return 0
