"""Decode throughput of record: the original, pruned models and converted ones, sampled as users sample, in one run.

    python benchmarks/bench_decode.py [NAME=]DIR ... [--paper] [--source smollm2] [--batch 1 16] [--prompt 256]
                                      [--new 128] [--repeats 3] [--compile] [--json FILE] [--plot FILE]

    # the record in the README and docs/generation.md (2-core CPU, about 40 minutes):
    python benchmarks/bench_decode.py --paper \\
        calibrated-routed=runs/quality-kv/convert-mod-kv-all-080-as-routed \\
        calibrated-all=runs/quality-kv/convert-mod-kv-all-080 pruned-8=runs/quality-kv/export-removal-080 \\
        --overhead --compile --json docs/decode.json --plot docs/decode.png

Each DIR is a converted model (``modify convert`` or ``modify calibrate``) or a plain checkpoint with blocks
deleted (``modify export``), of the one ``--source``. ``--paper`` adds the paper's plan built from the source
in memory: capacity 0.125 on every other block with ``kv="routed"`` and with ``kv="all"`` (seeded routers,
thresholds fitted on the calibration plays, so each block processes about 1 token in 8), and the source with as
many blocks deleted as that plan saves (13 of 30, every other one from block 3).

For each batch size: greedy ``generate()`` of ``--new`` tokens (no early stop) after a ``--prompt``-token prompt of
held-out plays, every model in turn, ``--repeats`` rounds, medians. Decode seconds are generate(new) minus
generate(1) (the prefill and first token). Beside each speedup over the original:

- the decode FLOP ratio (original / model), counted by ``torch.utils.flop_counter.FlopCounterMode`` over one
  more generate(new) minus generate(1), and in that same generation the share of routed-block positions the
  causal rule processed; ``speedup / FLOP ratio`` says how much of the saved arithmetic became time;
- memory: weights and the key-value cache after the generation (on CUDA, the peak allocated instead).

``--overhead``: for each converted model and batch size, decode steps with every routed block forced to process
every row, and to skip every row, against routing disabled: the routing's own cost per routed block, and the host
synchronisations per routed block per step (profiled); the same forced steps through the general per-token path
(``modify.routing.ragged``) that the decode fast path replaces; at batch > 1 also with the first 1, 2 and 4 rows forced
to process (what a block costs against the rows that run it).

``--compile``: the same at batch 1 with ``torch.compile(model.forward, dynamic=True)``: decode loops of ``--new``
steps on the model's own cache after an eager prefill, every model in turn, eager and compiled, ``--repeats``
rounds, medians of the step times; against the original compiled the same way (compile time reported, not
counted). The per-token path of routed blocks runs eagerly inside the compiled model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import modify  # noqa: E402
from modify.io.assets import shakespeare_split  # noqa: E402

PAPER_BLOCKS_DELETED = tuple(range(3, 29, 2))  # 13 blocks: 15 at capacity 0.125 save 15 · 0.875 ≈ 13.1 blocks


def prompts(tokenizer: Any, batch: int, length: int) -> torch.Tensor:
    _, held_out = shakespeare_split()
    ids = tokenizer(held_out[0].read_text(errors="ignore"), return_tensors="pt").input_ids[0]
    return torch.stack([ids[5000 + i * 997 : 5000 + i * 997 + length] for i in range(batch)])


class Processed:
    """The share of routed-block positions the causal rule processes (every block, every call)."""

    def __init__(self) -> None:
        self.kept = self.seen = 0

    def __enter__(self) -> Processed:
        import modify.routing.rules as rules

        self._rule = rule = rules.causal_process

        def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = rule(*args, **kwargs)
            self.kept, self.seen = self.kept + int(out.sum()), self.seen + out.numel()
            return out

        rules.causal_process = counted
        return self

    def __exit__(self, *exc: object) -> None:
        import modify.routing.rules as rules

        rules.causal_process = self._rule


def generate(model: Any, ids: torch.Tensor, new: int) -> Any:
    return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True)  # fmt: skip


def seconds(model: Any, ids: torch.Tensor, new: int) -> float:
    start = time.perf_counter()
    generate(model, ids, new)
    return time.perf_counter() - start


def memory_mb(model: Any, out: Any) -> float:
    """Weights and the generation's key-value cache, in MB (CPU); the peak allocated (CUDA)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    layers = getattr(out.past_key_values, "layers", [])
    cache = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values) if t is not None)
    return (weights + cache) / 2**20


def counted(model: Any, ids: torch.Tensor, new: int) -> dict[str, float]:
    """Decode FLOPs (generate(new) - generate(1)), the processed share of the decode steps, and memory."""
    totals = []
    for n in (new, 1):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        with FlopCounterMode(display=False) as flops, Processed() as processed:
            out = generate(model, ids, n)
        totals.append((flops.get_total_flops(), processed.kept, processed.seen))
        if n == new:
            memory = memory_mb(model, out)
    (f_all, k_all, s_all), (f_one, k_one, s_one) = totals
    share = (k_all - k_one) / (s_all - s_one) if s_all > s_one else 1.0
    return {"flops": f_all - f_one, "share": share, "memory_mb": memory}


def causal(model: Any) -> Any:
    """Outside ``generate()`` a converted model routes top-k; a decode loop of its own routes as sampling does."""
    converted = getattr(model.config, "mixture_of_depths", None)
    return modify.routing_mode(model, "causal") if converted else contextlib.nullcontext()


def decode_steps(model: Any, forward: Any, ids: torch.Tensor, steps: int) -> list[float]:
    """Seconds of each of ``steps`` decode steps through ``forward``, after an eager prefill."""
    with causal(model):
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            out = forward(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t)
    return times


def compiled_steps(models: dict[str, Any], ids: torch.Tensor, steps: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median decode step times of each model, eager and ``torch.compile``-d, every model in turn, ``repeats`` rounds
    of ``steps`` steps after each model's compilation (its time reported: a first pass of ``steps`` steps, less
    what the same steps take compiled)."""
    # one compiled forward per model, and each compiles twice (static, then dynamic shapes): past dynamo's default
    # limit of 8 per code object, later models would run eagerly without a word
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(models))
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    compiled, first = {}, {}
    for name, model in models.items():
        compiled[name] = torch.compile(model.forward, dynamic=True)
        first[name] = sum(decode_steps(model, compiled[name], ids, steps))
    times: dict[str, dict[str, list[float]]] = {n: {"eager": [], "compiled": []} for n in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name]["eager"].append(statistics.median(decode_steps(model, model.forward, ids, steps)))
            times[name]["compiled"].append(statistics.median(decode_steps(model, compiled[name], ids, steps)))
    result = {}
    for name, t in times.items():
        eager, fast = statistics.median(t["eager"]), statistics.median(t["compiled"])
        result[name] = {"eager_ms": eager * 1e3, "compiled_ms": fast * 1e3, "compile_s": first[name] - steps * fast}
    return result


def routing_overhead(model: Any, ids: torch.Tensor, steps: int = 16) -> dict[str, float]:
    """What routing costs a decode step, beside the blocks' own work: median step times with every routed block
    forced to process every row and to skip every row, against the same model with routing disabled (the
    original's computation); per routed block, the extra time of a processed call and the time of a skipped one
    relative to the dense block's. And the host synchronisations per routed block per step, counted by the
    profiler (``nonzero`` and scalar reads, ``aten::_local_scalar_dense``) in one decode step."""
    import modify.routing.rules as rules
    from modify.api import routed_blocks

    blocks = len(routed_blocks(model))
    rule = rules.causal_process

    def step_ms(force: bool | int | None, profile: bool = False) -> Any:
        if force is not None:  # True/False: every row or none; an int r: the first r rows
            rows = ids.shape[0] if force is True else 0 if force is False else force
            rules.causal_process = lambda state, block, x, scores, real, seen: (
                real & (torch.arange(x.shape[0], device=x.device)[:, None] < rows)
            )
        disabled = modify.routing_disabled(model) if force is None else modify.routing_mode(model, "causal")
        try:
            with torch.no_grad(), disabled:
                out = model(ids, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                times = []
                for _ in range(steps):
                    t = time.perf_counter()
                    out = model(token, past_key_values=cache, use_cache=True)
                    token = out.logits[:, -1:].argmax(-1)
                    times.append(time.perf_counter() - t)
                if profile:
                    from torch.profiler import profile as profiler

                    with profiler() as p:
                        model(token, past_key_values=cache, use_cache=True)
                    names = [e.name for e in p.events()]
                    return sum(n in ("aten::nonzero", "aten::_local_scalar_dense") for n in names)
            return statistics.median(times[4:]) * 1e3
        finally:
            rules.causal_process = rule

    dense = statistics.median(step_ms(None) for _ in range(3))
    processed = statistics.median(step_ms(True) for _ in range(3))
    skipped = statistics.median(step_ms(False) for _ in range(3))
    syncs = (step_ms(True, profile=True) - step_ms(None, profile=True)) / blocks
    # The fast path against the general per-token path it replaces for decode steps (both still in the package).
    import modify.routing.forward as routed_forward

    fast = routed_forward.fast_decode
    routed_forward.fast_decode = lambda *args: False
    try:
        general = {f"general_path_{k}_step_ms": statistics.median(step_ms(f) for _ in range(3))
                   for k, f in (("all_processed", True), ("none_processed", False))}  # fmt: skip
    finally:
        routed_forward.fast_decode = fast
    # Why a batch saves little: a block's cost against the number of its rows that run it.
    counts = [r for r in (1, 2, 4) if r < len(ids)]
    sweep = {f"{r}_rows_step_ms": statistics.median(step_ms(r) for _ in range(3)) for r in counts}
    return {"dense_step_ms": dense, "all_processed_step_ms": processed, "none_processed_step_ms": skipped,
            **general, **sweep, "processed_overhead_per_block_ms": (processed - dense) / blocks,
            "skipped_saving_per_block_ms": (dense - skipped) / blocks, "host_syncs_per_block_step": syncs}  # fmt: skip


def paper_models(source: str, tokenizer: Any) -> dict[str, Any]:
    """The paper's plan (capacity 0.125 on every other block) with each kv option, and the source with as many
    blocks deleted as it saves; thresholds fitted on the calibration plays."""
    from modify.io.checkpoint import load_source, resolve_source

    calibration, _ = shakespeare_split()
    text = " ".join(p.read_text(errors="ignore")[:20000] for p in calibration[:4])
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    windows = ids[: (len(ids) // 256) * 256].reshape(-1, 256)[:16]
    models = {}
    for kv in ("routed", "all"):
        model, _ = load_source(resolve_source(source))
        modify.convert(model, capacity=0.125, layers="every-other", kv=kv)
        with torch.no_grad():
            modify.fit_thresholds(model, [windows[i : i + 4] for i in range(0, len(windows), 4)])
        models[f"paper-{kv}"] = model.eval()
    pruned, _ = load_source(resolve_source(source))
    models[f"pruned-{len(PAPER_BLOCKS_DELETED)}"] = modify.remove_blocks(pruned, PAPER_BLOCKS_DELETED).eval()
    return models


def describe(model: Any) -> str:
    plan = getattr(model.config, "mixture_of_depths", None)
    if not plan:
        return f"plain, {model.config.num_hidden_layers} layers"
    kv = sorted(set(plan.get("kv") or ["routed"]))
    caps = plan["capacities"]
    return f"{len(plan['routed'])}/{plan['num_blocks']} routed, mean capacity {sum(caps) / len(caps):.3f}, kv {kv}"


def plot(rows: list[dict[str, Any]], path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["batch"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, (batch, mode) in zip(axes[0], groups, strict=True):
        sel = [r for r in rows if r["batch"] == batch and r["mode"] == mode]
        x = range(len(sel))
        ax.bar(x, [r["speedup"] for r in sel], color="tab:blue", label="decode speedup")
        ax.scatter(
            x, [r["decode_flop_ratio"] for r in sel], color="black", marker="_", s=400, label="decode FLOP ratio"
        )
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(list(x), [r["model"] for r in sel], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"batch {batch}, {mode}")
        ax.set_ylabel("× the original")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Decode against the original (SmolLM2-135M, {machine})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="[NAME=]DIR: converted models, or plain pruned ones, of --source")
    parser.add_argument("--paper", action="store_true", help="add the paper's plan (both kv) and its pruned model")
    parser.add_argument("--source", default="smollm2", help="the original (default: smollm2)")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also compare compiled decode steps at batch 1")
    parser.add_argument("--overhead", action="store_true", help="also time decode steps with routing decisions forced")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--plot", type=Path, help="write a plot of the speedups here")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from modify.io.checkpoint import load_source, resolve_source

    torch.manual_seed(0)
    original, tokenizer = load_source(resolve_source(args.source))
    models: dict[str, Any] = {"original": original.eval()}
    for spec in args.models:
        name, _, path = spec.rpartition("=")
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        load = modify.from_pretrained if "mixture_of_depths" in config else AutoModelForCausalLM.from_pretrained
        models[name or path.name] = load(path).eval()
    if args.paper:
        models.update(paper_models(args.source, tokenizer))
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {machine}")
    for name, model in models.items():
        print(f"  {name}: {describe(model)}")
    rows: list[dict[str, Any]] = []
    extras: list[dict[str, Any]] = []
    for batch in args.batch:
        ids = prompts(tokenizer, batch, args.prompt)
        tokens = batch * (args.new - 1)
        times: dict[str, dict[str, list[float]]] = {n: {"full": [], "one": []} for n in models}
        with torch.no_grad():
            for model in models.values():
                generate(model, ids, 4)  # warm-up
            for _ in range(args.repeats):
                for name, model in models.items():
                    times[name]["full"].append(seconds(model, ids, args.new))
                    times[name]["one"].append(seconds(model, ids, 1))
            counts = {name: counted(model, ids, args.new) for name, model in models.items()}
        decode = {n: statistics.median(t["full"]) - statistics.median(t["one"]) for n, t in times.items()}
        for name in models:
            rows.append(_row(batch, "eager", name, tokens / decode[name], decode["original"] / decode[name],
                             counts, args.new))  # fmt: skip
        _print([r for r in rows if r["batch"] == batch])
        if args.overhead:
            with torch.no_grad():
                for name, model in models.items():
                    if getattr(model.config, "mixture_of_depths", None):
                        overhead = routing_overhead(model, ids)
                        print(
                            f"batch {batch} {name} routing: " + ", ".join(f"{k} {v:.3f}" for k, v in overhead.items())
                        )
                        extras.append({"batch": batch, "model": name, **overhead})
        if args.compile and batch == 1:
            with torch.no_grad():
                steps = compiled_steps(models, ids, args.new, args.repeats)
            for name, step in steps.items():
                row = _row(batch, "compiled", name, 1e3 / step["compiled_ms"],
                           steps["original"]["compiled_ms"] / step["compiled_ms"], counts, args.new)  # fmt: skip
                row.update(step)
                rows.append(row)
            _print([r for r in rows if r["mode"] == "compiled"])
            for n, step in steps.items():
                print(f"{n}: eager step {step['eager_ms']:.1f} ms, compiled {step['compiled_ms']:.1f} ms "
                      f"(compile {step['compile_s']:.0f} s)", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine, "torch": torch.__version__, "rows": rows, "overhead": extras}, indent=2)
        )
    if args.plot:
        plot(rows, args.plot, machine)


def _row(batch: int, mode: str, name: str, rate: float, speedup: float, counts: dict, new: int) -> dict[str, Any]:
    ratio = counts["original"]["flops"] / counts[name]["flops"]
    return {"batch": batch, "mode": mode, "model": name, "tokens_per_s": rate, "speedup": speedup,
            "decode_flop_ratio": ratio, "speedup_over_flop_ratio": speedup / ratio,
            "processed_share": counts[name]["share"], "memory_mb": counts[name]["memory_mb"]}  # fmt: skip


def _print(rows: list[dict[str, Any]]) -> None:
    print()
    print(
        "| batch | mode | model | tok/s | speedup | decode FLOP ratio | speedup / FLOP ratio | processed | memory MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['mode']} | {r['model']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}× | "
              f"{r['decode_flop_ratio']:.2f}× | {r['speedup_over_flop_ratio']:.2f} | {r['processed_share']:.1%} | "
              f"{r['memory_mb']:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
