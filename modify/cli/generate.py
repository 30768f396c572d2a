"""``modify generate MODEL --prompt TEXT``: sample from a model, routed causally as in training's plan.

MODEL is a directory written by ``modify convert`` or ``modify train`` (sampled with causal routing: each
token decides alone whether each routed block processes it; see docs/generation.md) or any source ``modify
convert`` accepts (sampled dense). The continuation goes to stdout; with a converted model, the share of
routed-block positions that were processed and the decode speed go to stderr (or into ``--json``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

import modify
from modify.api import routed_blocks
from modify.cli.common import Progress, add_common_flags, emit_json, quiet_libraries
from modify.errors import ModifyError, UsageError
from modify.generate.cache import HISTORY_ATTR
from modify.io.checkpoint import load_any

EXAMPLES = """examples:
  modify generate out/smollm2-mod --prompt "To be, or not to be"           # greedy, 64 new tokens
  modify generate out/smollm2-mod --prompt-file prompt.txt --max-new-tokens 256 --sample --temperature 0.8 --seed 1
  modify generate out/smollm2-mod --prompt "What is a sonnet?" --chat      # the tokenizer's chat template
  modify generate out/smollm2-mod --prompt "Once" --routing topk           # per-call top-k (the mismatch to compare)
  modify generate smollm2 --prompt "Once upon a time" --json | jq .text     # the dense source"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="sample a continuation of a prompt (causal routing on converted models)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model", metavar="MODEL", help="a converted OUT, model directory, .gguf file, cached model id, or 'smollm2'"
    )
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", type=Path, metavar="FILE", help="read the prompt from a UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--seed", type=int, default=0, help="random seed for --sample (default 0)")
    p.add_argument(
        "--routing",
        choices=["causal", "topk"],
        default="causal",
        help="causal (default: each token decides alone, the plan's rule) or topk over each call's tokens",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: the model's)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_common_flags(p)
    p.set_defaults(run=run)


def _check_args(args: argparse.Namespace) -> str:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.temperature <= 0:
        raise UsageError(f"--temperature {args.temperature} must be > 0 (for greedy decoding drop --sample)")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p {args.top_p} must be in (0, 1]")
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise ModifyError(f"{args.prompt_file} does not exist; give a UTF-8 text file with --prompt-file")
        text = args.prompt_file.read_text(encoding="utf-8", errors="replace")
    else:
        text = args.prompt
    if not text.strip():
        raise UsageError("the prompt is empty; give some text with --prompt or --prompt-file")
    return text


def _uncalibrated(model: object) -> list[int]:
    """Routed blocks whose causal decision has nothing fitted or trained behind it (the threshold rule's
    threshold not set; "aux" and "predictor" are trained rules and say nothing here)."""
    blocks = routed_blocks(model)  # type: ignore[arg-type]
    return sorted(s.index for _, s in blocks if math.isnan(s.threshold) and s.causal != "aux" and s.capacity < 1)


def run(args: argparse.Namespace) -> int:
    text = _check_args(args)
    progress = Progress(args.quiet or args.json, args.debug)
    quiet_libraries(args.debug, progress.enabled)
    with progress.step(f"loading {args.model}"):
        model, tokenizer, source, converted = load_any(args.model, args.dtype)
    if tokenizer is None:
        raise ModifyError(f"{source.path} has no tokenizer; save one beside the model (tokenizer.save_pretrained)")
    if args.routing == "topk" and not converted:
        raise UsageError(f"--routing needs a converted model; {source.path} is dense (drop --routing)")
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"{source.path}'s tokenizer has no chat template; drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    uncalibrated: list[int] = []
    if converted:
        modify.set_routing(model, args.routing)
        uncalibrated = _uncalibrated(model)
        if uncalibrated and not args.quiet and not args.json:
            print(
                f"note: the routers of blocks {uncalibrated} are uncalibrated (no threshold fitted or trained): "
                "each block's threshold is set from this prompt to route its capacity share; calibrate "
                "(modify calibrate) or train (modify train) the model for routing chosen with data",
                file=sys.stderr,
            )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample, "return_dict_in_generate": True,
              "pad_token_id": pad}  # fmt: skip
    if args.sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
        torch.manual_seed(args.seed)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)  # greedy: no sampling settings to warn about
    start = time.perf_counter()
    with progress.step("generating"), torch.no_grad():
        out = model.generate(ids, **kwargs)
    seconds = time.perf_counter() - start
    new = out.sequences[0, ids.shape[1] :]
    continuation = tokenizer.decode(new, skip_special_tokens=True)
    summary = {
        "model": str(source.path),
        "converted": converted,
        "routing": args.routing if converted else "dense",
        "prompt_tokens": ids.shape[1],
        "new_tokens": int(new.numel()),
        "seconds": round(seconds, 3),
        "tokens_per_second": new.numel() / seconds,
        "text": continuation,
        "uncalibrated_blocks": uncalibrated,
    }
    history = getattr(out.past_key_values, HISTORY_ATTR, None)
    if history:
        shares = {layer: float(h.valid.float().mean()) for layer, h in sorted(history.items())}
        summary["processed_share"] = shares
    if args.json:
        emit_json(summary)
        return 0
    print(continuation)
    if not args.quiet:
        line = f"{summary['new_tokens']} tokens in {seconds:.2f} s ({summary['tokens_per_second']:.1f} tok/s)"
        if history:
            mean = sum(summary["processed_share"].values()) / len(history)
            line += f"; routed blocks processed {mean:.1%} of positions"
        print(line, file=sys.stderr)
    return 0
