"""Heal a retrofitted SmolLM2-135M with continued pretraining, against the dense model trained the same way.

    python examples/train_smollm2.py [--tokens 262144] [--sweep-tokens 32768] [--extra-budgets 0.9] [--ablations]
                                     [--skip-paths linear-128 mlp-96]

One command, CPU-sized, every step through the `modify` command line as a user would run it:

1. convert SmolLM2-135M-Instruct three ways: a plan calibrated at FLOP budget 0.75 (calibrated routers), one
   calibrated at 0.5, and the paper's plan (capacity 0.125 on every other block, fresh routers); with
   --skip-paths, also plans calibrated at 0.75 with each skip path as a candidate (``--skip-path``);
2. sweep --train modes and learning rates with short runs of the 0.75 plan, and keep the best by held-out
   perplexity (skip with --sweep-tokens 0 and give --train / --lr);
3. train each converted model and the dense model (``modify train smollm2 --dense``) on the same tokens of
   the plays titled A-L, the same way;
4. evaluate every model, before and after training, on the plays titled M-Z (``modify eval``);
5. print the tables and write the loss curves to WORK/loss_curves.png and everything to WORK/results.json.

Each step's output is kept in WORK and reused when the script is run again.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from modify.io.assets import shakespeare_split
from modify.train.report import read_metrics

SEQ_LEN, BATCH = 512, 4


def modify(*args: str) -> None:
    cmd = [sys.executable, "-m", "modify", *args]
    print("$ modify " + " ".join(a if len(a) < 60 else a[:57] + "..." for a in args), flush=True)
    subprocess.run(cmd, check=True)


def convert(work: Path, name: str, train: list[str], *options: str) -> Path:
    out = work / name
    if not (out / "config.json").is_file():
        modify(
            "convert",
            "smollm2",
            str(out),
            "-q",
            *options,
            *(["--calibrate", *train] if "--flops-budget" in options else []),
        )
    return out


def evaluate(model: str, held_out: list[str], tokens: int, work: Path, name: str) -> dict[str, Any]:
    path = work / f"eval-{name}.json"
    if not path.is_file():
        cmd = [sys.executable, "-m", "modify", "eval", model, "--data", *held_out, "--seq-len", str(SEQ_LEN),
               "--max-tokens", str(tokens), "--json", "-q"]  # fmt: skip
        path.write_text(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return json.loads(path.read_text())


def train(model: str, out: Path, data: list[str], held_out: list[str], tokens: int, mode: str, lr: float,
          eval_every: int, eval_tokens: int, dense: bool = False,
          extra: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    summary = out / "summary.json"
    if summary.is_file():  # reuse a finished run, but only one of these very settings
        import yaml

        saved = yaml.safe_load((out / "train_config.yaml").read_text())
        if (saved["train"], saved["lr"], saved["tokens"]) != (mode, lr, tokens):
            raise SystemExit(f"{out} holds a run with other settings; remove it or choose another --work")
    else:
        args = ["train", model, "--data", *data, "--eval-data", *held_out, "--out", str(out), "--tokens", str(tokens),
                "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH), "--train", mode, "--lr", str(lr),
                "--eval-every", str(eval_every), "--eval-tokens", str(eval_tokens), "--json", "-q"]  # fmt: skip
        if dense:
            args.append("--dense")
        args.extend(extra)
        cmd = [sys.executable, "-m", "modify", *args]
        print(
            f"$ modify train {model} --train {mode} --lr {lr:g} --tokens {tokens}{' --dense' if dense else ''}", *extra
        )
        summary.write_text(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return json.loads(summary.read_text())


def plot(curves: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, run in curves.items():
        rows = read_metrics(run / "metrics.csv")
        tokens = [r["tokens"] for r in rows]
        loss = [r["loss"] for r in rows]
        smooth = [sum(loss[max(0, i - 4) : i + 1]) / len(loss[max(0, i - 4) : i + 1]) for i in range(len(loss))]
        (line,) = left.plot(tokens, smooth, lw=1.2, label=label)
        evals = [(r["tokens"], math.log(r["eval_ppl"])) for r in rows if not math.isnan(r["eval_ppl"])]
        right.plot(*zip(*evals), "o-", ms=3, color=line.get_color(), label=label)
    left.set_title("training loss (plays A-L, mean of 5 steps)")
    right.set_title("held-out loss (plays M-Z)")
    for ax in (left, right):
        ax.set_xlabel("training tokens")
        ax.set_ylabel("nats per token")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/train_smollm2"), help="where every output goes")
    parser.add_argument("--tokens", type=int, default=262144, help="training tokens of each model")
    parser.add_argument("--sweep-tokens", type=int, default=32768, help="training tokens of each sweep run (0: none)")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens of each evaluation")
    parser.add_argument("--train", default="full", help="--train mode when there is no sweep")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate when there is no sweep")
    parser.add_argument("--extra-budgets", type=float, nargs="*", default=[0.9], help="more calibrated plans to train")
    parser.add_argument(
        "--skip-paths", nargs="*", default=[], help="skip paths (linear-128, mlp-96) to calibrate and train at 0.75"
    )
    parser.add_argument(
        "--ablations", action="store_true", help="short runs of the 0.75 plan beyond the sweep: lr, anneal, router lr"
    )
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    train_files, eval_files = shakespeare_split()
    data, held_out = [str(p) for p in train_files], [str(p) for p in eval_files]
    start = time.perf_counter()

    plans = {
        "calibrated 0.75": convert(work, "convert-cal075", data, "--flops-budget", "0.75"),
        "calibrated 0.5": convert(work, "convert-cal050", data, "--flops-budget", "0.5"),
        "paper: every other at 0.125": convert(work, "convert-paper", data, "--capacity", "0.125"),
    }
    for budget in args.extra_budgets:
        name = f"convert-cal{round(budget * 100):03d}"
        plans[f"calibrated {budget:g}"] = convert(work, name, data, "--flops-budget", str(budget))
    for spec in args.skip_paths:
        kind, rank = spec.split("-")
        name = f"convert-cal075-{kind}{rank}"
        options = ("--flops-budget", "0.75", "--skip-path", kind, "--skip-rank", rank)
        plans[f"calibrated 0.75, {spec} skip paths"] = convert(work, name, data, *options)
    results: dict[str, Any] = {"tokens": args.tokens, "seq_len": SEQ_LEN, "batch_size": BATCH, "sweep": []}

    mode, lr = args.train, args.lr
    if args.sweep_tokens:
        grid = [("full", 3e-5), ("full", 1e-4), ("full", 3e-4), ("lora", 1e-3), ("routers+norms", 1e-3),
                ("routers", 1e-3)]  # fmt: skip
        for m, rate in grid:
            out = work / f"sweep-{m.replace('+', '-')}-{rate:g}"
            s = train(
                str(plans["calibrated 0.75"]), out, data, held_out, args.sweep_tokens, m, rate, 0, args.eval_tokens
            )
            results["sweep"].append(
                {"train": m, "lr": rate, "eval_ppl": s["eval_ppl"], "tokens_per_second": s["tokens_per_second"]}
            )
        best = min(results["sweep"], key=lambda r: r["eval_ppl"])
        mode, lr = best["train"], best["lr"]
        print("\nsweep on the calibrated 0.75 plan,", args.sweep_tokens, "tokens each:")
        for r in results["sweep"]:
            print(f"  --train {r['train']:<14} --lr {r['lr']:<7g} held-out ppl {r['eval_ppl']:8.2f}")
        print(f"best: --train {mode} --lr {lr:g}\n")
    results["train"], results["lr"] = mode, lr
    if args.ablations and args.sweep_tokens:
        steps = args.sweep_tokens // (SEQ_LEN * BATCH)
        variants = {
            f"--lr 1e-3 (above the sweep's {lr:g})": ("ablation-lr-0.001", 1e-3, ()),
            f"--capacity-anneal {steps // 2}": ("ablation-anneal", lr, ("--capacity-anneal", str(steps // 2))),
            "--router-lr 1e-2 (10x)": ("ablation-router-lr", lr, ("--router-lr", "1e-2")),
            "--weight-decay 0.1": ("ablation-weight-decay", lr, ("--weight-decay", "0.1")),
        }
        results["ablations"] = []
        reference = next(r["eval_ppl"] for r in results["sweep"] if (r["train"], r["lr"]) == (mode, lr))
        print(f"ablations on the calibrated 0.75 plan, {args.sweep_tokens} tokens each, --train {mode} --lr {lr:g}: "
              f"held-out ppl {reference:.2f}")  # fmt: skip
        for label, (name, rate, extra) in variants.items():
            s = train(str(plans["calibrated 0.75"]), work / name, data, held_out, args.sweep_tokens, mode, rate, 0,
                      args.eval_tokens, extra=extra)  # fmt: skip
            results["ablations"].append({"change": label, "eval_ppl": s["eval_ppl"]})
            print(f"  {label:<36} held-out ppl {s['eval_ppl']:8.2f}")

    eval_every = max(1, args.tokens // (SEQ_LEN * BATCH) // 6)
    dense_mode = mode if mode in ("full", "lora") else "full"  # a dense model has no routers to train alone
    runs = {"dense": train("smollm2", work / "train-dense", data, held_out, args.tokens, dense_mode, lr, eval_every,
                           args.eval_tokens, dense=True)}  # fmt: skip
    for label, path in plans.items():
        runs[label] = train(str(path), work / f"train-{path.name.removeprefix('convert-')}", data, held_out,
                            args.tokens, mode, lr, eval_every, args.eval_tokens)  # fmt: skip
    zero_shot = {"dense": evaluate("smollm2", held_out, args.eval_tokens, work, "dense-original")}
    trained = {}
    for label, path in plans.items():
        zero_shot[label] = evaluate(str(path), held_out, args.eval_tokens, work, path.name)
    for label, run in runs.items():
        trained[label] = evaluate(run["out"], held_out, args.eval_tokens, work, Path(run["out"]).name)

    dense_ppl = trained["dense"]["ppl"]
    rows = []
    for label in runs:
        rows.append({
            "model": label, "flops_per_token": trained[label]["flops_per_token"],
            "flop_ratio": trained[label]["flops_per_token"] / trained["dense"]["flops_per_token"],
            "train_tokens_per_second": runs[label]["tokens_per_second"],
            "eval_tokens_per_second": trained[label]["tokens_per_second"],
            "zero_shot_ppl": zero_shot[label]["ppl"], "trained_ppl": trained[label]["ppl"],
            "vs_trained_dense": trained[label]["ppl"] / dense_ppl, "train": runs[label]["train"],
        })  # fmt: skip
    results["rows"] = rows
    # the gap to the dense model over training, at each evaluation (the same steps for every run)
    curves = {label: read_metrics(Path(run["out"]) / "metrics.csv") for label, run in runs.items()}
    evals = {label: {r["tokens"]: r["eval_ppl"] for r in rows_ if not math.isnan(r["eval_ppl"])}
             for label, rows_ in curves.items()}  # fmt: skip
    results["gap_over_training"] = {
        label: {t: ppl / evals["dense"][t] for t, ppl in points.items() if t in evals["dense"]}
        for label, points in evals.items()
        if label != "dense"
    }
    results["seconds"] = time.perf_counter() - start
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot({label: Path(run["out"]) for label, run in runs.items()}, work / "loss_curves.png")

    print(f"held-out perplexity on {args.eval_tokens} tokens of plays M-Z; training: {args.tokens} tokens of plays "
          f"A-L, --train {mode} --lr {lr:g}, seq {SEQ_LEN}, batch {BATCH}")  # fmt: skip
    print(f"| model | FLOPs/token (fwd, T={SEQ_LEN}) | vs dense | train tok/s | eval tok/s | zero-shot ppl | "
          "trained ppl | vs trained dense |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['flops_per_token'] / 1e6:.1f}M | {r['flop_ratio']:.2f} | "
              f"{r['train_tokens_per_second']:.0f} | {r['eval_tokens_per_second']:.0f} | {r['zero_shot_ppl']:.2f} | "
              f"{r['trained_ppl']:.2f} | {r['vs_trained_dense']:.2f}x |")  # fmt: skip
    print(f"original dense model, untrained: {zero_shot['dense']['ppl']:.2f}; total {results['seconds'] / 60:.1f} min")
    print("\nheld-out perplexity vs the dense model at the same point of training (evaluations during training):")
    points = sorted(evals["dense"])
    print("| model | " + " | ".join(f"{t // 1024}k tokens" for t in points) + " |")
    print("|---|" + "---|" * len(points))
    for label, gap in results["gap_over_training"].items():
        print(f"| {label} | " + " | ".join(f"{gap[t]:.2f}x" if t in gap else "" for t in points) + " |")
    print(f"wrote {work / 'results.json'} and {work / 'loss_curves.png'}")


if __name__ == "__main__":
    main()
