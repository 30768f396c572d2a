"""``modify eval MODEL --data FILES | --tasks T1,T2``: held-out perplexity, or lm-evaluation-harness tasks.

MODEL is a directory written by ``modify convert`` (evaluated routed, as trained) or any source ``modify
convert`` accepts (evaluated dense).

With --data, the text is tokenized with MODEL's tokenizer and packed into sequences of ``--seq-len`` tokens,
read once in order; the loss is the mean next-token cross entropy over every predicted token (see
:mod:`modify.train.evaluate`), with throughput and FLOPs per token.

With --tasks, lm-evaluation-harness 0.4.x (pip install "modify[eval]") scores the loaded model object through
its HFLM wrapper (:mod:`modify.bench.harness`). The output states how log-likelihoods were routed: top-k
over each request's whole text, or causal as in generate(); generative tasks use generate(), which routes
causally. The offline tasks modify ships (tag modify_offline) are always on the task path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import modify
from modify.cli.common import Parser, Progress, add_common_flags, emit_json, load_harness, quiet_libraries
from modify.errors import ModifyError, UnsupportedModelError, UsageError
from modify.io.checkpoint import atomic_file, check_parent, load_any, load_tokenizer, resolve_source
from modify.train.data import PackedStream, collect_files
from modify.train.evaluate import evaluate

EXAMPLES = """examples:
  modify eval out/smollm2-mod --data plays/m*.txt              # perplexity of a converted checkpoint
  modify eval smollm2 --data plays/m*.txt --max-tokens 8192     # the dense source on the same text
  modify eval out/smollm2-mod --data heldout/ --seq-len 1024 --batch-size 2 --dtype bfloat16
  modify eval out/smollm2-mod --data heldout.txt --json | jq .ppl
  modify eval out/smollm2-mod --data plays/m*.txt --routing causal   # each token decides alone, as when sampling

  modify eval out/smollm2-mod --tasks modify_offline --baseline smollm2   # offline tasks, scores over the source's
  modify eval out/smollm2-mod --tasks modify_pydoc_ending --limit 50 --routing causal
  modify eval out/smollm2-mod --tasks hellaswag,arc_easy,arc_challenge,piqa,winogrande,mmlu --batch-size 8
  modify eval out/smollm2-mod --tasks my_task --include-path my_tasks/ --num-fewshot 5 --output scores.json

--data takes text files or directories of them. The sequences are read once, in order.
--tasks needs lm-evaluation-harness 0.4.x (pip install "modify[eval]"); lm-eval's own tasks fetch their
datasets from the Hugging Face hub, the tag modify_offline needs nothing. Plain `lm_eval --model hf` can't
load a converted OUT: use `modify-lm-eval --model modify --model_args pretrained=OUT` (docs/eval.md)."""

#: Flags of one mode, refused in the other: (dest, the mode's flag).
_DATA_ONLY = ("seq_len", "max_tokens")
_TASKS_ONLY = ("num_fewshot", "limit", "include_path", "output", "baseline")


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
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--data", nargs="+", type=Path, metavar="PATH", help="perplexity on UTF-8 text files or directories"
    )
    what.add_argument(
        "--tasks",
        type=_task_list,
        metavar="T1,T2",
        help="lm-eval tasks, groups or tags, comma-separated (modify_offline: the offline tasks modify ships)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=512,
        action=_Given,
        help="with --data: tokens per sequence, at least 2 (default 512, train's and calibrate's default, so that "
        "perplexities compare; inspect reports FLOPs at 2048, the model card's length)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="sequences per forward (default 8); with --tasks and --routing topk, log-likelihoods go one request "
        "per forward",
    )
    p.add_argument("--max-tokens", type=int, help="with --data: evaluate at most this many tokens (default: all)")
    p.add_argument(
        "--routing",
        choices=["topk", "causal"],
        default="topk",
        help="how routed blocks choose tokens: topk over each sequence or request (the training rule, default) or "
        "causal, each token deciding alone as when sampling (the plan's causal rule); generation is always causal",
    )
    p.add_argument(
        "--num-fewshot", type=int, metavar="N", help="with --tasks: examples in each prompt (default: the task's)"
    )
    p.add_argument(
        "--limit", type=float, metavar="N", help="with --tasks: at most N documents per task (below 1: a share of them)"
    )
    p.add_argument(
        "--include-path",
        type=Path,
        action="append",
        metavar="DIR",
        help="with --tasks: a folder of task YAML files to add (repeatable)",
    )
    p.add_argument(
        "--output", type=Path, metavar="FILE", help="with --tasks: write the scores and lm-eval's results as JSON"
    )
    p.add_argument(
        "--baseline",
        metavar="SRC",
        help="with --tasks: also score SRC (the source MODEL was converted from) and print each score over its",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="weights dtype (default: the checkpoint's); routers stay float32",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_common_flags(p)
    p.checks.append(_check_mode)
    p.set_defaults(run=run)


def _task_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no task named; give names separated by commas, e.g. modify_offline")
    return names


class _Given(argparse.Action):
    """Store the value and note that the flag was given: --seq-len has a default, yet is refused with --tasks."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None):
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def _check_mode(parser: Parser, args: argparse.Namespace) -> None:
    """Refuse a flag of the other mode, which would be silently ignored."""
    wrong, mode = (_DATA_ONLY, "--tasks") if args.tasks is not None else (_TASKS_ONLY, "--data")
    typed = getattr(args, "given", set())  # --seq-len has a default, so only _Given knows it was typed
    given = [
        f"--{dest.replace('_', '-')}"
        for dest in wrong
        if (dest in typed if dest == "seq_len" else getattr(args, dest, None) is not None)
    ]
    if given:
        parser.error(f"{', '.join(given)} can't be used with {mode}; drop {'them' if len(given) > 1 else 'it'}")


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
    if args.tasks is not None:
        return _run_tasks(args)
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


def _check_task_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size} must be at least 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError(f"--num-fewshot {args.num_fewshot} must be 0 or more")
    if args.limit is not None and not (args.limit > 0 and (args.limit < 1 or args.limit == int(args.limit))):
        raise UsageError(f"--limit {args.limit:g} must be a whole number of documents, or a share below 1")
    if args.output is not None:
        check_parent(args.output.expanduser().resolve())


def _load_for_tasks(src: str, args: argparse.Namespace, progress: Progress) -> tuple[Any, Any, bool]:
    with progress.step(f"loading {src}"):
        model, tokenizer, source, converted = load_any(src, args.dtype)
    if tokenizer is None:
        raise ModifyError(f"{source.path} has no tokenizer to score tasks with; save one beside the model")
    return model, tokenizer, converted


def _run_tasks(args: argparse.Namespace) -> int:
    _check_task_args(args)
    progress = Progress(args.quiet or args.json, args.debug)
    quiet_libraries(args.debug, progress.enabled)
    harness = load_harness()
    with progress.step("indexing tasks"):
        manager, tasks = harness.task_manager(args.tasks, args.include_path or [])
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    model, tokenizer, converted = _load_for_tasks(args.model, args, progress)
    if args.routing == "causal" and not converted:
        raise UsageError(f"--routing causal needs a converted model; {args.model} is dense (drop --routing)")
    if args.baseline is not None:  # before minutes of scoring, not after
        theirs = load_tokenizer(resolve_source(args.baseline))
        if theirs is not None:
            harness.check_same_tokenizer(tokenizer, theirs, args.model, args.baseline)
    start = time.perf_counter()
    lm = harness.ModifyLM(model, routing=args.routing, tokenizer=tokenizer, batch_size=args.batch_size)
    with progress.step(f"scoring {', '.join(tasks)}"):
        scores, raw = harness.run_tasks(lm, tasks, manager, args.num_fewshot, limit)
    routed = lm.routed
    del lm, model
    base: dict[tuple[str, str], float] = {}
    if args.baseline is not None:
        model, theirs, _ = _load_for_tasks(args.baseline, args, progress)
        harness.check_same_tokenizer(tokenizer, theirs, args.model, args.baseline)
        lm = harness.ModifyLM(model, routing=args.routing, tokenizer=theirs, batch_size=args.batch_size)
        with progress.step(f"scoring the baseline {args.baseline}"):
            theirs_scores, _ = harness.run_tasks(lm, tasks, manager, args.num_fewshot, limit)
        base = {(b.task, b.metric): b.value for b in theirs_scores}
    rows = [
        {
            "task": sc.task,
            "metric": sc.metric,
            "higher_is_better": sc.higher_is_better,
            "score": sc.value,
            "stderr": None if math.isnan(sc.stderr) else sc.stderr,
            **({"baseline": base.get((sc.task, sc.metric))} if args.baseline is not None else {}),
        }
        for sc in scores
    ]
    for row in rows:
        if row.get("baseline"):
            row["over_baseline"] = row["score"] / row["baseline"]
    summary = {
        "model": args.model,
        "converted": converted,
        "routing": args.routing if routed else "dense",
        "routing_note": harness.routing_note(args.routing, routed),
        "lm_eval": harness.LM_EVAL_VERSION,
        "tasks": tasks,
        "num_fewshot": args.num_fewshot,
        "limit": limit,
        "batch_size": args.batch_size,
        "baseline": args.baseline,
        "seconds": round(time.perf_counter() - start, 1),
        "scores": rows,
    }
    if args.output is not None:
        full = {**summary, "lm_eval_results": {k: v for k, v in raw.items() if k != "samples"}}
        atomic_file(
            args.output.expanduser(), lambda tmp: tmp.write_text(json.dumps(full, indent=1, default=str) + "\n")
        )
    if args.json:
        emit_json(summary)
    else:
        print(_table(summary))
    return 0


def _table(summary: dict[str, Any]) -> str:
    """The scores as aligned text: task, metric (arrow: which way is better), score, stderr, over the baseline."""
    shots = "the tasks' own shots" if summary["num_fewshot"] is None else f"{summary['num_fewshot']}-shot"
    limit = f", at most {summary['limit']:g} documents per task" if summary["limit"] is not None else ""
    head = [
        f"{summary['model']}: {summary['routing_note']}",
        f"lm-eval {summary['lm_eval']}, {shots}{limit}, {summary['seconds']:.0f} s",
    ]
    columns = ["task", "metric", "score", "± stderr"]
    if summary["baseline"] is not None:
        columns.append(f"over {summary['baseline']}")
    arrows = {True: " ↑", False: " ↓", None: ""}
    cells = []
    for r in summary["scores"]:
        row = [r["task"], r["metric"] + arrows[r["higher_is_better"]], _number(r["score"]),
               "" if r["stderr"] is None else f"{r['stderr']:.4f}"]  # fmt: skip
        if summary["baseline"] is not None:
            row.append(f"{r['over_baseline']:.3f}" if "over_baseline" in r else "–")
        cells.append(row)
    widths = [max(len(c[i]) for c in [columns, *cells]) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in
             [columns, *cells]]  # fmt: skip
    return "\n".join([*head, "", *(line.rstrip() for line in lines)])


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"  # perplexities of an untrained model run to 1e10
