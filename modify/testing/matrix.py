"""The support matrix: every causal-LM family of the installed transformers, converted and checked.

    python -m modify.testing.matrix                     # print the table
    python -m modify.testing.matrix --write docs/support-matrix.md --json matrix.json
    python -m modify.testing.matrix llama qwen3 bloom   # some families only

For each model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny random model is built from the family's
own config class (:func:`modify.testing.tiny_configs.tiny_config`, eager attention) and checked, one column
each (:mod:`modify.testing.family_checks`): identity at capacity 1.0, routed against an independent reference
at capacity 0.5 (:mod:`modify.testing.reference`), cached ``generate()``, FLOPs, padding, training, revert.

A family is supported when every column passes, "unverified" when every column passes but the reference
can't be built for it; otherwise its row gives the first failure, in ``modify``'s own words where ``modify``
refused the model. Families outside the method's scope (:data:`EXCLUDED`) get a row with the rule that
excludes them and are not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import modify
from modify.errors import UnsupportedModelError
from modify.io.checkpoint import atomic_file
from modify.testing.family_checks import (
    CHECKS,
    COLUMNS,
    OPTIONAL_CHECKS,
    OPTIONAL_COLUMNS,
    Inputs,
    eager_experts,
    restore,
)
from modify.testing.reference import UnverifiedError
from modify.testing.tiny_configs import tiny_config

__all__ = ["EXCLUDED", "Row", "build", "check_family", "eager_experts", "run_matrix", "markdown", "main"]

#: model_type -> why the family is outside Mixture-of-Depths' scope (a rule, not a failure).
EXCLUDED: dict[str, str] = {
    **{
        t: "encoder-only: a bidirectional encoder with an optional LM head, not a causal decoder"
        for t in (
            "bert",
            "bert-generation",
            "big_bird",
            "camembert",
            "data2vec-text",
            "electra",
            "ernie",
            "megatron-bert",
            "rembert",
            "roberta",
            "roberta-prelayernorm",
            "roc_bert",
            "roformer",
            "xlm",
            "xlm-roberta",
            "xlm-roberta-xl",
            "xmod",
        )
    },
    **{
        t: "encoder-decoder: the causal-LM class is the decoder half of a seq2seq model"
        for t in (
            "bart",
            "bigbird_pegasus",
            "blenderbot",
            "blenderbot-small",
            "marian",
            "mbart",
            "mvp",
            "pegasus",
            "plbart",
            "prophetnet",
            "trocr",
            "whisper",
        )
    },
    **{
        t: "state-space or recurrent only: no attention block on a residual stream to route"
        for t in ("mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm")
    },
    **{t: "audio codebooks: several token streams per position" for t in ("musicgen", "musicgen_melody", "moshi")},
}


@dataclass
class Row:
    """One family: ``status`` "supported" (every column passes), "unverified" (every column passes but the
    reference, which could not be built), "unsupported" or "excluded"; ``checks`` maps each column to "pass",
    "fail", "unverified" or "refused" (modify refuses the family, with the reason)."""

    model_type: str
    model_class: str
    status: str
    reason: str = ""
    forms: str = ""
    seconds: float = 0.0
    checks: dict[str, str] = field(default_factory=dict)


def _first_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc  # config validation wraps the reason (StrictDataclassClassValidationError)
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"[:300]


def build(model_type: str, **overrides: Any) -> Any:
    """The family's tiny model: eager attention, the family's default experts, parameters perturbed;
    ``overrides`` change its config."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn_like(p) * 0.02)
    return model.float().eval()


def check_family(model_type: str) -> Row:
    """Build the family's tiny model and run every check; the row says which passed and why the others didn't."""
    start = time.perf_counter()
    row = Row(model_type, "", "unsupported")
    try:
        model = build(model_type)
        row.model_class = type(model).__name__
        inputs = Inputs.of(model)
    except Exception as exc:  # noqa: BLE001 - a row per family, whatever broke
        row.reason = f"build: {_first_line(exc)}"
        row.seconds = round(time.perf_counter() - start, 2)
        return row
    reasons = []
    for column, check in CHECKS:
        try:
            check(model, inputs)
            row.checks[column] = "pass"
            if column == "identity":
                row.forms = ", ".join(sorted({b.form for b in modify.find_blocks(model)}))
        except UnsupportedModelError as exc:
            row.checks[column] = "refused"
            reasons.append(f"{column}: {exc}")
        except UnverifiedError as exc:
            row.checks[column] = "unverified"
            reasons.append(f"unverified at c < 1: {exc}")
        except Exception as exc:  # noqa: BLE001 - a row per family, whatever broke
            row.checks[column] = "fail"
            reasons.append(f"{column}: {_first_line(exc)}")
            if "--verbose" in sys.argv:
                traceback.print_exc()
        finally:
            restore(model)
        if row.checks[column] == "refused" and column == "identity":  # modify refuses the family: nothing to run
            break
    values = set(row.checks.values())
    if values == {"pass"} and len(row.checks) == len(COLUMNS):
        row.status = "supported"
    elif values <= {"pass", "unverified"} and len(row.checks) == len(COLUMNS):
        row.status = "unverified"
    row.reason = reasons[0] if reasons else ""
    if row.status in ("supported", "unverified"):  # an option's refusal doesn't make the family unsupported
        for column, check in OPTIONAL_CHECKS:
            try:
                check(model, inputs)
                row.checks[column] = "pass"
            except UnsupportedModelError as exc:
                row.checks[column] = "refused"
                row.reason = row.reason or f"{column}: {exc}"
            except Exception as exc:  # noqa: BLE001 - a row per family, whatever broke
                row.checks[column] = "fail"
                row.reason = row.reason or f"{column}: {_first_line(exc)}"
            finally:
                restore(model)
    row.seconds = round(time.perf_counter() - start, 2)
    return row


def _worker(model_type: str) -> Row:
    torch.set_num_threads(1)
    return check_family(model_type)


def run_matrix(model_types: list[str] | None = None, processes: int = 2, timeout: float = 300.0) -> list[Row]:
    """One row per causal-LM model type (all of them by default), checked in ``processes`` worker processes."""
    mapping = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    types = model_types or sorted(mapping)
    rows: dict[str, Row] = {}
    todo = []
    for t in types:
        if t in EXCLUDED:
            rows[t] = Row(t, str(mapping.get(t, "")), "excluded", EXCLUDED[t])
        else:
            todo.append(t)
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes, maxtasksperchild=8) as pool:
        pending = {t: pool.apply_async(_worker, (t,)) for t in todo}
        for t, result in pending.items():
            try:
                rows[t] = result.get(timeout)
            except Exception as exc:  # noqa: BLE001 - a crashed or hung family is a row too
                rows[t] = Row(t, str(mapping.get(t, "")), "unsupported", f"check: {_first_line(exc)}")
    return [rows[t] for t in types]


def _cell(value: str) -> str:
    return {"pass": "✓", "fail": "✗", "unverified": "?", "refused": "refused"}.get(value, "–")


def markdown(rows: list[Row], transformers_version: str, seconds: float) -> str:
    counted = [r for r in rows if r.status != "excluded"]
    ok = [r for r in counted if r.status == "supported"]
    unverified = [r for r in counted if r.status == "unverified"]
    share = len(ok) / len(counted) if counted else math.nan
    split = [r for r in ok if all(r.checks.get(c) == "pass" for c in OPTIONAL_COLUMNS)]
    lines = [
        "# Support matrix",
        "",
        f"Generated by `python -m modify.testing.matrix --write docs/support-matrix.md` with transformers "
        f"{transformers_version} in {seconds:.0f} s on {os.cpu_count()} CPU cores. Each causal-LM model type "
        "transformers registers gets a tiny random model built from its own config class; see "
        "`modify/testing/family_checks.py` for the checks, one per column. Excluded by rule: encoder-only models, "
        "the decoder halves of encoder-decoder models, state-space or recurrent models without attention, "
        "audio-codebook models.",
        "",
        f"**{len(ok)} of {len(counted)} decoder families supported ({share:.0%})**: every column passes, the "
        f"routed blocks equal an independent reference at capacity 0.5 and cached `generate()` is exact. "
        f"{len(unverified)} more pass every column but the reference, which can't be built for them (unverified at "
        f"c < 1); {len(rows) - len(counted)} model types excluded by rule. {len(split)} of the {len(ok)} supported "
        "families also equal their reference with `kv=\"all\"` (skipped tokens keep their keys and values; the "
        "attention split derived from the traced graph); the others are refused for that option, with the reason.",
        "",
        "✓ passes, ✗ fails, ? unverified, refused: modify refuses the family (reason given), – not run.",
        "",
        "| model type | class | status | " + " | ".join(COLUMNS + OPTIONAL_COLUMNS) + " | block forms | reason |",
        "|---|---|---|" + "---|" * len(COLUMNS + OPTIONAL_COLUMNS) + "---|---|",
    ]
    for r in rows:
        reason = r.reason.replace("|", "\\|").replace("\n", " ")
        cells = " | ".join(_cell(r.checks.get(c, "")) for c in COLUMNS + OPTIONAL_COLUMNS)
        lines.append(f"| {r.model_type} | {r.model_class} | {r.status} | {cells} | {r.forms} | {reason} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modify.testing.matrix", description=__doc__.split("\n")[0])
    parser.add_argument("model_types", nargs="*", help="model types to check (default: every causal-LM type)")
    parser.add_argument("--write", help="write the Markdown table here")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.verbose:
        rows = [_worker(t) for t in args.model_types]
    else:
        rows = run_matrix(args.model_types or None, args.processes)
    seconds = time.perf_counter() - start
    text = markdown(rows, transformers.__version__, seconds)
    if args.write:
        atomic_file(Path(args.write), lambda tmp: tmp.write_text(text))
    if args.json:
        payload = {"transformers": transformers.__version__, "seconds": seconds, "rows": [asdict(r) for r in rows]}
        atomic_file(Path(args.json), lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
