"""Benchmark retention of SmolLM2-135M at 0.80 of the FLOPs: the offline lm-eval tasks, original against
blocks deleted and the calibrated retrofit, zero-shot and (where they exist) healed.

    python examples/quality_smollm2.py --work runs/quality --budgets 0.8 --heal-budgets --methods removal mixed
    python examples/eval_retention_smollm2.py --work runs/quality [--limit N]

The first command calibrates the two plans at 0.80 of the forward FLOPs (T = 512): ``convert-removal-080``
(only whole blocks removed) and ``convert-mixed-080`` (the planner chooses among removal and MoD capacities).
The ``kv="all"`` plan of docs/training.md (``convert-mod-kv-all-080``, healed by distillation with its routers
frozen: ``heal-kd-mod-kv-all-080-router-lr-0``) gets its rows when WORK holds it (``--work runs/quality-kv``).
With ``--heal-budgets 0.8`` it also heals them (``heal-lm-*``, ``heal-kd-*``); this script adds a row for each
healed model it finds. The removal plan is scored as the plain checkpoint ``modify export`` writes.

Every model is scored by ``modify eval MODEL --tasks modify_offline`` (top-k routing of log-likelihoods, the
training rule), written to WORK/tasks-NAME.json and reused when the script runs again. Prints the Markdown
table of docs/eval.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

#: (task, metric) columns: the two multiple-choice tasks' accuracies and the passages' bits per byte.
COLUMNS = [
    ("modify_shakespeare_next_line", "acc"),
    ("modify_shakespeare_next_line", "acc_norm"),
    ("modify_pydoc_ending", "acc"),
    ("modify_pydoc_ending", "acc_norm"),
    ("modify_shakespeare_bpb", "bits_per_byte"),
]
HEADERS = ["next line acc", "next line acc_norm", "pydoc ending acc", "pydoc ending acc_norm", "bits/byte ↓"]
REMOVAL = "{deleted} blocks deleted (`--removal only`, `modify export`)"
KV_ALL = "calibrated `--kv all` plan (`--removal never --kv all`)"
#: (label, healing, model directory under WORK or "smollm2"); healed rows appear when their directory exists.
ROWS = [
    ("original", "–", "smollm2"),
    (REMOVAL, "zero-shot", "export-removal-080"),
    (REMOVAL, "LM loss", "heal-lm-removal-080"),
    (REMOVAL, "`--distill`", "heal-kd-removal-080"),
    ("calibrated retrofit (`--removal allow`)", "zero-shot", "convert-mixed-080"),
    ("calibrated retrofit (`--removal allow`)", "LM loss", "heal-lm-mixed-080"),
    ("calibrated retrofit (`--removal allow`)", "`--distill`", "heal-kd-mixed-080"),
    (KV_ALL, "zero-shot", "convert-mod-kv-all-080"),
    (KV_ALL, "`--distill`, routers frozen", "heal-kd-mod-kv-all-080-router-lr-0"),
]


def modify(*args: str, capture: bool = False) -> str:
    print("$ modify " + " ".join(args), file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, "-m", "modify", *args], check=True, capture_output=capture, text=True)
    return proc.stdout


def scores(model: str, path: Path, limit: int | None) -> dict[tuple[str, str], float]:
    if not path.is_file():
        extra = ["--limit", str(limit)] if limit else []
        modify("eval", model, "--tasks", "modify_offline", *extra, "--json", "-q", "--output", str(path), capture=True)
    report = json.loads(path.read_text())
    return {(r["task"], r["metric"]): r["score"] for r in report["scores"]}


def routed_flops(model: str, path: Path) -> float:
    """Forward FLOPs at T = 512 as routed (the model's own count for a plain checkpoint), by ``modify inspect``."""
    if not path.is_file():
        path.write_text(modify("inspect", model, "--seq-len", "512", "--json", "-q", capture=True))
    return json.loads(path.read_text())["flops"]["routed"]


def table(rows: list[dict[str, Any]]) -> str:
    original = rows[0]["scores"]
    lines = ["| plan | healing | FLOPs vs original | " + " | ".join(HEADERS) + " |", "|---" * (len(HEADERS) + 3) + "|"]
    for row in rows:
        cells = []
        for key in COLUMNS:
            value = row["scores"][key]
            cells.append(f"{value:.3f}" if row is rows[0] else f"{value:.3f} ({value / original[key]:.2f}×)")
        lines.append(f"| {row['label']} | {row['healing']} | {row['flops']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/quality"), help="quality_smollm2.py's --work")
    parser.add_argument("--limit", type=int, help="at most N documents per task (default: all)")
    args = parser.parse_args()
    work = args.work
    removal, exported = work / "convert-removal-080", work / "export-removal-080"
    if (removal / "config.json").is_file() and not (exported / "config.json").is_file():
        modify("export", str(removal), str(exported), "-q")
    rows = []
    for label, healing, name in ROWS:
        model = name if name == "smollm2" else str(work / name)
        if name != "smollm2" and not (work / name / "config.json").is_file():
            continue
        suffix = f"-limit{args.limit}" if args.limit else ""
        result = scores(model, work / f"tasks-{name}{suffix}.json", args.limit)
        ratio = routed_flops(model, work / f"flops-{name}.json") / routed_flops("smollm2", work / "flops-smollm2.json")
        if "{deleted}" in label:
            layers = json.loads((work / name / "config.json").read_text())["num_hidden_layers"]
            label = label.format(deleted=30 - layers)  # SmolLM2-135M has 30 blocks
        rows.append({"label": label, "healing": healing, "flops": f"{ratio:.3f}", "scores": result})
    print(table(rows))


if __name__ == "__main__":
    main()
