"""The support matrix: every causal-LM family of the installed transformers, converted and checked.

    python -m modify.testing.matrix                     # print the table
    python -m modify.testing.matrix --write docs/support-matrix.md --json matrix.json
    python -m modify.testing.matrix llama qwen3 bloom   # some families only

For each model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny random model is built from the family's
own config class (:func:`modify.testing.tiny_configs.tiny_config`, eager attention) and checked:

1. capacity 1.0 on every block reproduces the logits (1e-4; padded batch and plain batch);
2. ``modify.flops`` equals the measured FLOPs (``FlopCounterMode``, experts run as a loop of linears so the
   counter sees them) dense and with the paper's plan (every other block at 12.5%);
3. the paper's plan never selects a padding token while real tokens remain;
4. the paper's plan trains: finite loss, finite and non-zero router gradients;
5. ``modify.revert`` gives back the original logits exactly.

A family passes when all five hold; otherwise its row gives the first failure, in ``modify``'s own words
where ``modify`` refused the model. Families outside the method's scope (:data:`EXCLUDED`) get a row with the
rule that excludes them and are not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import modify
from modify.errors import UnsupportedModelError
from modify.flops import flop_counter
from modify.io.checkpoint import atomic_file
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

_BATCH, _LENGTH, _PAD = 2, 32, 5


@dataclass
class Row:
    model_type: str
    model_class: str
    status: str  # "supported", "unsupported", "excluded"
    reason: str = ""
    forms: str = ""
    seconds: float = 0.0


def _first_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc  # config validation wraps the reason (StrictDataclassClassValidationError)
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"[:300]


def _inputs(vocab: int) -> tuple[Any, Any]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, max(vocab, 4), (_BATCH, _LENGTH), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :_PAD] = 0  # left padding
    mask[1, -_PAD:] = 0  # right padding
    return ids, mask


@contextlib.contextmanager
def eager_experts(model: Any) -> Iterator[Any]:
    """Inside, Mixture-of-Experts layers run their experts as a loop of linears, which torch's FLOP counter
    sees itself (the default grouped matmuls it doesn't). A model without switchable experts is left as it is."""
    try:
        previous = model.get_experts_implementation()
        model.set_experts_implementation("eager")
    except Exception:  # noqa: BLE001 - no switchable experts
        previous = None
    try:
        yield model
    finally:
        if previous is not None:
            model.set_experts_implementation(previous)


def _measured(model: Any, ids: Any) -> int:
    """torch's FLOP counter (totals only) on a forward with eager experts: ``modify.flops`` counts the default
    grouped expert matmuls by its own formula, so this checks that too."""
    with eager_experts(model), torch.no_grad(), flop_counter() as counter:
        model(input_ids=ids, use_cache=False)
    return counter.get_total_flops()


def _logits(model: Any, ids: Any, mask: Any = None) -> Any:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.logits.float()


def build(model_type: str) -> Any:
    """The family's tiny model: eager attention, the family's default experts, parameters perturbed."""
    config = tiny_config(model_type)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn_like(p) * 0.02)
    return model.float().eval()


def check_family(model_type: str) -> Row:
    """Build the family's tiny model and run the five checks; the row says which failed first and why."""
    start = time.perf_counter()
    row = Row(model_type, "", "unsupported")
    stage = "build"
    try:
        model = build(model_type)
        row.model_class = type(model).__name__
        config = model.config.get_text_config()
        ids, mask = _inputs(config.vocab_size)
        real = mask.bool()
        dense_masked = _logits(model, ids, mask)
        dense = _logits(model, ids)
        measured_dense = _measured(model, ids)

        stage = "capacity 1.0"
        modify.convert(model, capacity=1.0, layers="all")
        row.forms = ", ".join(sorted({b.form for b in modify.find_blocks(model)}))
        for got, want, where in ((_logits(model, ids, mask), dense_masked, real), (_logits(model, ids), dense, None)):
            err = (got - want).abs()
            err = err[where] if where is not None else err
            if not err.max() <= 1e-4:
                raise AssertionError(f"capacity 1.0 changed the logits by {err.max():.2e}")
        modify.revert(model)

        stage = "flops"
        modify.convert(model, capacity=0.125, layers="every-other")
        count = modify.flops(model, _LENGTH, _BATCH)
        measured_routed = _measured(model, ids)
        if (count.dense, count.routed) != (measured_dense, measured_routed):
            raise AssertionError(
                f"modify.flops gives {count.dense} dense / {count.routed} routed, "
                f"measured {measured_dense} / {measured_routed}"
            )

        stage = "padding"
        picked: list[torch.Tensor] = []
        for _, state in modify.api.routed_blocks(model):
            original = state.topk

            def topk(scores: torch.Tensor, padding: Any, original: Any = original) -> torch.Tensor:
                idx = original(scores, padding)
                picked.append(idx)
                return idx

            state.topk = topk  # type: ignore[method-assign]
        _logits(model, ids, mask)
        for _, state in modify.api.routed_blocks(model):
            del state.topk
        if not picked:
            raise AssertionError("no routed block selected tokens")
        for idx in picked:
            if not real.gather(1, idx.cpu()).all():
                blind = [
                    s.name
                    for _, s in modify.api.routed_blocks(model)
                    if s.spec.pairwise is None and s.spec.padding_mask is None
                ]
                if blind:
                    raise AssertionError(
                        f"{blind[0]} gets neither an attention mask nor a padding mask, so it can't tell padding "
                        "from real tokens"
                    )
                raise AssertionError("a padding token was selected while real tokens remained")

        stage = "training"
        model.train()
        # The loss from the logits, not the model's labels path (GIT's expects image tokens in front).
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        targets = ids.masked_fill(~real, -100)[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten())
        if not torch.isfinite(loss):
            raise AssertionError(f"the paper's plan gives loss {loss.item()}")
        loss.backward()
        # A fresh router's gate scale is 0 (every gate exactly 1): the scale gets gradient first, the weights
        # once it has moved; all of them must be finite.
        grads = [p.grad for n, p in model.named_parameters() if "mod_router" in n]
        if not grads or any(g is None or not torch.isfinite(g).all() for g in grads):
            raise AssertionError("a router got no gradient or a non-finite one")
        if not any(g.abs().sum() > 0 for g in grads):
            raise AssertionError("the router gradients are all zero")
        model.eval()

        stage = "revert"
        modify.revert(model)
        if not torch.equal(_logits(model, ids), dense):
            raise AssertionError("revert did not give back the original logits exactly")
        row.status = "supported"
    except UnsupportedModelError as exc:
        row.reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - a row per family, whatever broke
        row.reason = f"{stage}: {_first_line(exc)}"
        if "--verbose" in sys.argv:
            traceback.print_exc()
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


def markdown(rows: list[Row], transformers_version: str, seconds: float) -> str:
    counted = [r for r in rows if r.status != "excluded"]
    ok = [r for r in counted if r.status == "supported"]
    share = len(ok) / len(counted) if counted else math.nan
    lines = [
        "# Support matrix",
        "",
        f"Generated by `python -m modify.testing.matrix --write docs/support-matrix.md` with transformers "
        f"{transformers_version} in {seconds:.0f} s on {os.cpu_count()} CPU cores. Each causal-LM model type "
        "transformers registers gets a tiny random model built from its own config class; see "
        "`modify/testing/matrix.py` for the checks. Excluded by rule: encoder-only models, the decoder halves of "
        "encoder-decoder models, state-space or recurrent models without attention, audio-codebook models.",
        "",
        f"**{len(ok)} of {len(counted)} decoder families supported ({share:.0%})**; "
        f"{len(rows) - len(counted)} model types excluded by rule.",
        "",
        "| model type | class | status | block forms | reason |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        reason = r.reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.model_type} | {r.model_class} | {r.status} | {r.forms} | {reason} |")
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
        rows = [check_family(t) for t in args.model_types]
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
