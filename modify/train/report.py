"""What a run records: ``metrics.csv`` (and TensorBoard where installed), and ``report.png``.

Columns of metrics.csv: step, tokens, lr, router_lr, loss (language model), aux_loss, kd_loss and hidden_loss
(with ``--distill``), grad_norm, skipped, tokens_per_second, elapsed, eval_ppl and eval_kl (on evaluation steps;
the KL to the teacher with ``--distill``), then per routed block N gate_N, entropy_N and
overlap_N (see :mod:`modify.train.stats`). A resumed run keeps the rows up to its checkpoint and appends.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MetricsLog", "plot_report", "read_metrics", "BASE_COLUMNS"]

BASE_COLUMNS = [
    "step", "tokens", "lr", "router_lr", "loss", "aux_loss", "kd_loss", "hidden_loss", "grad_norm", "skipped",
    "tokens_per_second", "elapsed", "eval_ppl", "eval_kl",
]  # fmt: skip


def read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.csv as rows of numbers (step and tokens as int; empty cells are NaN)."""
    with open(path, newline="") as f:
        rows = [{k: float(v) if v != "" else math.nan for k, v in row.items()} for row in csv.DictReader(f)]
    for row in rows:
        row["step"], row["tokens"] = int(row["step"]), int(row["tokens"])
    return rows


class MetricsLog:
    """Appends one row per step to ``out/metrics.csv`` on the main process; keeps the rows in memory."""

    def __init__(self, out: Path, blocks: list[int], main: bool, keep_until: int = 0) -> None:
        self.path = out / "metrics.csv"
        self.columns = BASE_COLUMNS + [f"{kind}_{b}" for b in blocks for kind in ("gate", "entropy", "overlap")]
        self.blocks = blocks
        self.main = main
        self.rows: list[dict[str, float]] = []
        self.tensorboard: Any = None
        if not main:
            return
        if keep_until and self.path.is_file():  # a resumed run: drop what the killed run logged after its checkpoint
            self.rows = [r for r in read_metrics(self.path) if r["step"] <= keep_until]
        self.file = open(self.path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.columns, restval="")
        self.writer.writeheader()
        for row in self.rows:
            self.writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
        self.file.flush()
        try:  # optional dependency: tensorboard (pip install modify[tensorboard])
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(
                str(out / "tensorboard"), purge_step=keep_until + 1 if keep_until else None
            )
        except ImportError:  # not installed: metrics.csv alone
            pass

    def write(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        if not self.main:
            return
        self.writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
        self.file.flush()
        if self.tensorboard is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    group = "routing" if key.split("_")[0] in ("gate", "entropy", "overlap") else "train"
                    self.tensorboard.add_scalar(f"{group}/{key}", value, step)

    def close(self) -> None:
        if self.main:
            self.file.close()
            if self.tensorboard is not None:
                self.tensorboard.close()


def plot_report(out: Path, metrics: MetricsLog, main: bool) -> None:
    """report.png: the loss curves, and per routed block its mean gate and router entropy over training."""
    if not main or not metrics.rows:
        return
    # import time: matplotlib (about 0.4 s) loads only to draw the chart, on Agg (no display needed)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # import time: as matplotlib, once its backend is chosen

    rows = metrics.rows
    steps = [r["step"] for r in rows]
    panels = 3 if metrics.blocks else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, [r["loss"] for r in rows], lw=1, label="train loss")
    evals = [(r["step"], math.log(r["eval_ppl"])) for r in rows if not math.isnan(r.get("eval_ppl", math.nan))]
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss (log ppl)")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.set_title("loss")
    ax.legend()
    heat_maps = [(axes[0][1], "gate", "mean gate"), (axes[0][2], "entropy", "router entropy")] if metrics.blocks else []
    for ax, kind, label in heat_maps:
        grid = np.array([[r.get(f"{kind}_{b}", math.nan) for r in rows] for b in metrics.blocks])
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", extent=(steps[0], steps[-1], len(grid), 0))
        ax.set_yticks([i + 0.5 for i in range(len(metrics.blocks))], [str(b) for b in metrics.blocks], fontsize=6)
        ax.set_xlabel("step")
        ax.set_ylabel("routed block")
        ax.set_title(label)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    plt.close(fig)
