"""Decode throughput: the dense model against converted ones sampling with causal routing, in one run.

    python benchmarks/bench_decode.py MODEL_DIR [MODEL_DIR ...] [--pruned DIR] [--prompt 256] [--new 128]
                                      [--batch 1 16] [--repeats 3]

Each MODEL_DIR is a converted model (``modify convert``, with ``--kv routed`` or ``--kv all``, or
``examples/causal_routing_smollm2.py``, which writes the paper's plan with calibrated routers and thresholds to
``runs/causal/paper-threshold``) of one source; the dense model is the first one's weights with the routing
disabled, so it and the converted models differ only in routing. ``--pruned`` adds a plain checkpoint with
blocks deleted (``modify export``), decoded as the dense model it is. For each
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
from modify.io.assets import shakespeare_split  # noqa: E402


def prompts(tokenizer, batch: int, length: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    _, held_out = shakespeare_split()
    ids = tokenizer(held_out[0].read_text(errors="ignore"), return_tensors="pt").input_ids[0]
    starts = [5000 + i * 997 for i in range(batch)]
    return torch.stack([ids[s : s + length] for s in starts])


class Processed:
    """Counts the share of routed-block positions the causal rule processes (every block, every call)."""

    def __init__(self) -> None:
        self.kept = self.seen = 0

    def __enter__(self) -> Processed:
        import modify.routing.rules as rules

        self._rule = rule = rules.causal_process

        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            out = rule(*args, **kwargs)
            self.kept, self.seen = self.kept + int(out.sum()), self.seen + out.numel()
            return out

        rules.causal_process = counted
        return self

    def __exit__(self, *exc: object) -> None:
        import modify.routing.rules as rules

        rules.causal_process = self._rule

    @property
    def share(self) -> float:
        return self.kept / max(1, self.seen)


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


def measure(model, ids: torch.Tensor, new: int, repeats: int, dense: bool) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Decode seconds (median of generate(new) minus generate(1)), decode FLOPs and the processed share."""
    with torch.no_grad():
        generate(model, ids, 4, dense)  # warm-up
        full = [seconds(model, ids, new, dense) for _ in range(repeats)]
        prefill = [seconds(model, ids, 1, dense) for _ in range(repeats)]
        count = flops(model, ids, new, dense) - flops(model, ids, 1, dense)
        with Processed() as processed:
            generate(model, ids, new, dense)
            first = processed.seen
        with Processed() as prompt_only:
            generate(model, ids, 1, dense)
    share = (processed.kept - prompt_only.kept) / max(1, first - prompt_only.seen) if not dense else 1.0
    return {"seconds": statistics.median(full) - statistics.median(prefill), "flops": count, "share": share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+", help="converted model directories of one source")
    parser.add_argument("--pruned", type=Path, help="a plain checkpoint with blocks deleted (modify export)")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--rows-sweep", action="store_true", help="also time decode steps with r rows forced to run")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    models = {path.name: modify.from_pretrained(path).eval() for path in args.models}
    if args.pruned is not None:
        models[args.pruned.name] = AutoModelForCausalLM.from_pretrained(args.pruned).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.models[0])
    original = next(iter(models.values()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    for name, model in models.items():
        plan = getattr(model.config, "mixture_of_depths", None)
        kv = sorted(set(plan.get("kv") or ["routed"])) if plan else "-"
        described = f"{len(plan['routed'])}/{plan['num_blocks']} routed, kv {kv}" if plan else "plain"
        print(f"  {name}: {described}, {model.config.num_hidden_layers} layers")
    rows = []
    for batch in args.batch:
        ids = prompts(tokenizer, batch, args.prompt)
        steps = batch * (args.new - 1)
        base = measure(original, ids, args.new, args.repeats, True)
        print(f"batch {batch:>3}: original {steps / base['seconds']:8.1f} tok/s", flush=True)
        for name, model in models.items():
            plain = not hasattr(model.config, "mixture_of_depths")
            got = measure(model, ids, args.new, args.repeats, False) if not plain else measure(
                model, ids, args.new, args.repeats, True
            )  # fmt: skip
            row = {
                "batch": batch,
                "model": name,
                "original_tokens_per_s": steps / base["seconds"],
                "tokens_per_s": steps / got["seconds"],
                "speedup": base["seconds"] / got["seconds"],
                "decode_flop_ratio": base["flops"] / got["flops"],
                "decode_processed_share": got["share"],
            }
            rows.append(row)
            print(
                f"           {name:<28} {row['tokens_per_s']:8.1f} tok/s  speedup {row['speedup']:.2f}x  "
                f"decode FLOP ratio {row['decode_flop_ratio']:.2f}x  routed positions processed {got['share']:.1%}",
                flush=True,
            )
        if args.rows_sweep and batch > 1:
            rows_sweep(original, ids)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
