"""Decode throughput: the dense model against the converted one sampling with causal routing, in one run.

    python benchmarks/bench_decode.py MODEL_DIR [--prompt 256] [--new 128] [--batch 1 16] [--repeats 3]

MODEL_DIR is a converted model (``modify convert`` or ``examples/causal_routing_smollm2.py``, which writes the
paper's plan with calibrated routers and thresholds to ``runs/causal/paper-threshold``); the dense model is
the same weights with the routing removed (``modify.revert``), so the two differ only in routing. For each
batch size: greedy ``generate()`` of ``--new`` tokens (no early stop) after a ``--prompt``-token prompt of
held-out plays, dense and converted interleaved, ``--repeats`` times, median seconds; decode tokens per second
count the new tokens after the first (the prefill's), measured as generate(new) minus generate(1).

Beside each measured speedup: the FLOP ratio of the decode steps (dense / converted), counted by
``torch.utils.flop_counter.FlopCounterMode`` over the same generation (generate(new) minus generate(1)), and the
share of routed-block positions the converted model processed while decoding. A ratio of time below the FLOP
ratio is overhead: at batch 1 on a CPU, decoding is bound by per-operation dispatch more than by arithmetic.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import modify  # noqa: E402
from modify.generate.cache import HISTORY_ATTR  # noqa: E402
from modify.io.assets import shakespeare_split  # noqa: E402


def prompts(tokenizer, batch: int, length: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    _, held_out = shakespeare_split()
    ids = tokenizer(held_out[0].read_text(errors="ignore"), return_tensors="pt").input_ids[0]
    starts = [5000 + i * 997 for i in range(batch)]
    return torch.stack([ids[s : s + length] for s in starts])


def generate(model, ids: torch.Tensor, new: int, dense: bool):  # type: ignore[no-untyped-def]
    kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0,
              "return_dict_in_generate": True}  # fmt: skip
    if dense:
        with modify.routing_disabled(model):
            return model.generate(ids, **kwargs)
    return model.generate(ids, **kwargs)


def seconds(model, ids: torch.Tensor, new: int, dense: bool) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    generate(model, ids, new, dense)
    return time.perf_counter() - start


def flops(model, ids: torch.Tensor, new: int, dense: bool) -> int:  # type: ignore[no-untyped-def]
    with FlopCounterMode(display=False) as counter:
        generate(model, ids, new, dense)
    return counter.get_total_flops()


def rows_sweep(model, ids: torch.Tensor, steps: int = 10) -> None:  # type: ignore[no-untyped-def]
    """Why a batch gains little: the decode step's time when every routed block processes exactly r of the
    batch's rows (the causal decision forced), against dense. The routed blocks' share of the step falls with
    r only if a block's cost does; a block's weights are read whole whichever rows run it."""
    import modify.routing.rules as routing

    batch = ids.shape[0]
    rule = routing.causal_process

    def step_ms(rows: int | None) -> float:
        if rows is not None:
            routing.causal_process = lambda s, b, x, sc, real, seen: real & (torch.arange(x.shape[0])[:, None] < rows)
        try:
            with (
                torch.no_grad(),
                modify.routing_disabled(model) if rows is None else modify.routing_mode(model, "causal"),
            ):
                out = model(ids, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                start = time.perf_counter()
                for _ in range(steps):
                    out = model(nxt, cache=cache, use_cache=True)
                    nxt = out.logits[:, -1:].argmax(-1)
                return (time.perf_counter() - start) / steps * 1e3
        finally:
            routing.causal_process = rule

    dense = step_ms(None)
    cells = [f"dense {dense:.1f} ms"]
    for rows in sorted({0, 1, 2, 4, batch // 2, batch}):
        cells.append(f"{rows} rows {step_ms(rows):.1f} ms")
    print(f"batch {batch:>3} decode step, every routed block processing r rows: " + ", ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--rows-sweep", action="store_true", help="also time decode steps with r rows forced to run")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = modify.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    plan = model.config.mixture_of_depths
    print(f"{args.model}: {len(plan['routed'])}/{plan['num_blocks']} blocks routed, rule {plan['causal']}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")  # fmt: skip
    rows = []
    for batch in args.batch:
        ids = prompts(tokenizer, batch, args.prompt)
        with torch.no_grad():
            generate(model, ids, 4, True)  # warm-up
            generate(model, ids, 4, False)
            times = {True: [], False: []}
            prefill = {True: [], False: []}
            for _ in range(args.repeats):
                for dense in (True, False):
                    times[dense].append(seconds(model, ids, args.new, dense))
                    prefill[dense].append(seconds(model, ids, 1, dense))
            decode = {d: statistics.median(times[d]) - statistics.median(prefill[d]) for d in (True, False)}
            count = {d: flops(model, ids, args.new, d) - flops(model, ids, 1, d) for d in (True, False)}
            out = generate(model, ids, args.new, False)
        history = getattr(out.past_key_values, HISTORY_ATTR)
        share = sum(float(h.valid[:, args.prompt :].float().mean()) for h in history.values()) / len(history)
        steps = batch * (args.new - 1)
        row = {
            "batch": batch,
            "dense_tokens_per_s": steps / decode[True],
            "modify_tokens_per_s": steps / decode[False],
            "speedup": decode[True] / decode[False],
            "decode_flop_ratio": count[True] / count[False],
            "decode_processed_share": share,
        }
        rows.append(row)
        if args.rows_sweep and batch > 1:
            rows_sweep(model, ids)
        print(
            f"batch {batch:>3}: dense {row['dense_tokens_per_s']:8.1f} tok/s  "
            f"modify {row['modify_tokens_per_s']:8.1f} tok/s  "
            f"speedup {row['speedup']:.2f}x  decode FLOP ratio {row['decode_flop_ratio']:.2f}x  "
            f"routed positions processed {share:.1%}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
