"""``modify verify OUT``: check a converted checkpoint against its source.

Checks: the routers load (none missing, none unexpected); every weight but the routers equals the source's;
converting the source at capacity 1.0 reproduces its logits (within 1e-4); the FLOPs of OUT equal those of
the source converted with OUT's plan. With ``--text``, the perplexity of source and OUT on that text (the
routers of a fresh conversion are untrained, so OUT's is expected to be far higher until it is trained).

OUT records its source by name, size and SHA-256, not by path: the source is ``--source SRC``, else the
recorded model id (in the local Hugging Face cache) or ``smollm2``; it must match the record.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

import modify
from modify.cli.common import Progress, add_common_flags, emit_json, quiet_libraries
from modify.config import CONFIG_KEY, MoDConfig
from modify.errors import ModifyError
from modify.io.checkpoint import (
    DEFAULT_SOURCE,
    is_converted_directory,
    load_source,
    load_tokenizer,
    resolve_source,
    source_label,
)

EXAMPLES = """examples:
  modify verify out/smollm2-mod
  modify verify out/smollm2-mod --text play.txt --json
  modify verify out/llama-mod --source ./my-llama      # a source that has no model id: say where it is"""

_WINDOW, _WINDOWS = 256, 8


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check a converted checkpoint against its source",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", metavar="OUT", help="a directory written by 'modify convert'")
    p.add_argument("--text", type=Path, help="a UTF-8 text file for perplexity (up to 8 windows of 256 tokens)")
    p.add_argument(
        "--source",
        metavar="SRC",
        help="the checkpoint OUT was converted from (default: its recorded model id, or smollm2); "
        "checked against OUT's record of it",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_common_flags(p)
    p.set_defaults(run=run)


def _windows(tokenizer: Any, text_path: Path | None, vocab: int) -> torch.Tensor:
    if text_path is None or tokenizer is None:
        return torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(0))
    ids = tokenizer(text_path.read_text(errors="replace")[:400_000], return_tensors="pt").input_ids[0]
    count = min(_WINDOWS, max(1, ids.numel() // _WINDOW))
    ids = ids[: count * _WINDOW]
    return ids.view(count, -1) if ids.numel() == count * _WINDOW else ids.unsqueeze(0)


def _perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(model(ids, labels=ids, use_cache=False).loss.item())


def find_source(record: dict[str, Any], given: str | None) -> Any:
    """The source ``record`` describes: ``given``, else the path older versions recorded, the model id (hub
    cache) or smollm2; refused (ModifyError) when none is found or its files don't match the record."""
    label = source_label(record)
    if given is not None:
        candidates = [given]
    else:
        found = (record.get("path"), record.get("model_id"), DEFAULT_SOURCE if record.get("kind") == "smollm2" else "")
        candidates = [c for c in found if c]
    for candidate in candidates:
        try:
            source = resolve_source(candidate)
        except ModifyError:
            if given is not None:
                raise
            continue  # not here: try the next way
        problem = source.mismatch(record)
        if problem:
            raise ModifyError(
                f"{candidate} is not the source OUT was converted from ({label}): {problem}; "
                "pass --source SRC with that checkpoint"
            )
        return source
    raise ModifyError(
        f"cannot find the source OUT was converted from ({label}); "
        "pass --source SRC: the model directory or .gguf file it was converted from"
    )


def run(args: argparse.Namespace) -> int:
    progress = Progress(args.quiet or args.json, args.debug)
    quiet_libraries(args.debug, progress.enabled)
    target = resolve_source(args.out)
    if not is_converted_directory(target):
        raise ModifyError(f"{target.path} is not a converted checkpoint (no Mixture-of-Depths plan in config.json)")
    if args.text is not None and not args.text.is_file():
        raise ModifyError(f"--text {args.text} is not a file")
    # Found (and checked against its record) before anything is loaded.
    with progress.step("finding the source"):
        record = json.loads((target.path / "config.json").read_text())[CONFIG_KEY].get("source") or {}
        source = find_source(record, args.source)
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    with progress.step(f"loading {target.path}"):
        out_model, info = AutoModelForCausalLM.from_pretrained(target.path, output_loading_info=True)
    out_model.eval()
    plan = MoDConfig.from_dict(out_model.config.mixture_of_depths)
    bad = [k for k in (*info["missing_keys"], *info["unexpected_keys"]) if "router" in k]
    routed = [b.index for b in modify.find_blocks(out_model) if b.routed]
    check(
        "routers load",
        not bad and routed == plan.routed,
        f"{len(routed)} routed blocks" + (f"; bad keys {bad[:3]}" if bad else ""),
    )

    result: dict[str, Any] = {}
    with progress.step(f"loading the source {source.path.name}"):
        src_model, tokenizer = load_source(source, str(next(out_model.parameters()).dtype).removeprefix("torch."))
    src_state = src_model.state_dict()
    out_state = {k: v for k, v in out_model.state_dict().items() if "router" not in k}
    differ = [k for k, v in src_state.items() if k not in out_state or not torch.equal(out_state[k], v)]
    check("weights", not differ, "equal to the source's" if not differ else f"{len(differ)} differ, e.g. {differ[0]}")

    tokenizer = load_tokenizer(target) or tokenizer
    ids = _windows(tokenizer, args.text, out_model.config.get_text_config().vocab_size)
    with torch.no_grad(), progress.step("checking capacity 1.0 against the source"):
        reference = src_model(ids[:1], use_cache=False).logits
        if args.text is not None:
            result["ppl_source"] = _perplexity(src_model, ids)
        modify.convert(src_model, capacity=1.0, layers=plan.routed)
        identity = src_model(ids[:1], use_cache=False).logits
    diff = (identity - reference).abs().max().item()
    check("capacity 1.0 reproduces the source", diff <= 1e-4, f"max |logit difference| {diff:.3g}")

    modify.revert(src_model)
    modify.convert(src_model, plan=plan)
    expected, actual = modify.flops(src_model, 2048), modify.flops(out_model, 2048)
    check(
        "FLOPs match the plan",
        (expected.dense, expected.routed) == (actual.dense, actual.routed),
        f"routed {actual.routed:.4g} of dense {actual.dense:.4g} at 2048 tokens ({actual.ratio:.1%})",
    )
    if args.text is not None:
        with progress.step("perplexity"):
            result["ppl_converted"] = _perplexity(out_model, ids)

    ok = all(c["ok"] for c in checks)
    if args.json:
        emit_json({"ok": ok, "out": str(target.path), "checks": checks, **result})
    else:
        for c in checks:
            print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}")
        if "ppl_source" in result:
            print(
                f"perplexity on {args.text}: source {result['ppl_source']:.2f}, "
                f"converted {result.get('ppl_converted', float('nan')):.2f}"
            )
        print("verified" if ok else "verification FAILED")
    return 0 if ok else 1
