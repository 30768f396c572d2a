"""``modify bench``'s outputs: the terminal table, the JSON summary, CSV rows and the speedup chart."""

from __future__ import annotations

import csv
import io
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
import transformers
from rich.console import Console
from rich.table import Table

from modify.io.checkpoint import atomic_file

__all__ = ["environment", "summary", "table", "markdown", "write_csv", "plot"]


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What a row needs to be reproduced: device, dtype, library versions and the git commit."""
    try:  # optional dependency: triton (Linux only; the CPU path runs without it)
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    try:
        root = Path(__file__).resolve().parents[2]
        git = ["git", "-C", str(root)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10)  # fmt: skip
        commit = commit.stdout.strip() + ("-dirty" if commit.stdout.strip() and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        commit = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": f"{device.type}: {name}",
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "commit": commit,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (plan, B, T): ``forward_speedup``, ``train_speedup``, ``flop_ratio`` and the baselines'."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for record in records:
        for row in record.get("results", []):
            if row["plan"] is None:
                continue
            key = (row["plan"], record["batch_size"], record["seq_len"])
            entry = out.setdefault(key, {"plan": key[0], "batch_size": key[1], "seq_len": key[2], "flop_ratio": None})
            mode = record["mode"]
            impl = row["implementation"]
            if impl == "converted":
                entry["flop_ratio"] = row["flop_ratio"]
                entry[f"{mode}_speedup"] = row["speedup"]
                entry[f"{mode}_routing_share"] = row.get("routing_share")
                entry[f"{mode}_share_of_flop_ratio"] = row["speedup"] / row["flop_ratio"]
            else:
                entry[f"{mode}_{impl.replace('-', '_').replace('+', '_')}_speedup"] = row["speedup"]
    return list(out.values())


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f}G" if n >= 2**30 else f"{n / 2**20:.0f}M"


def table(records: list[dict[str, Any]]) -> str:
    """The results as a plain-text table (rich renders it; no colour codes, so it pastes into Markdown too)."""
    t = Table(title="modify bench: median seconds, speedup over dense, FLOP ratio dense/variant")
    for col in ("mode", "B", "T", "variant", "s", "speedup", "FLOP ratio", "of ratio", "routing", "peak mem"):
        t.add_column(col, justify="right" if col not in ("mode", "variant") else "left")
    for record in records:
        b, seq, mode = str(record["batch_size"]), str(record["seq_len"]), record["mode"]
        if "skipped" in record:
            t.add_row(mode, b, seq, f"skipped: {record['skipped']}", *[""] * 6)
            continue
        for row in record["results"]:
            share = row.get("routing_share")
            of_ratio = row["speedup"] / row["flop_ratio"] if row["implementation"] == "converted" else None
            t.add_row(
                mode, b, seq, row["name"], f"{row['seconds']:.3f}", f"{row['speedup']:.2f}x",
                f"{row['flop_ratio']:.2f}x", f"{of_ratio:.0%}" if of_ratio is not None else "",
                f"{share:.1%}" if share is not None else "", _fmt_bytes(row["peak_memory_bytes"]),
            )  # fmt: skip
    buffer = io.StringIO()
    Console(file=buffer, width=160, color_system=None).print(t)
    return buffer.getvalue()


def markdown(records: list[dict[str, Any]], env: dict[str, Any]) -> str:
    """Per mode, one Markdown row per (plan, B, T): the converted model against its FLOP ratio, and the others."""
    lines = [f"{env['device']}, {env['cpu_threads']} threads, {env['dtype']}, torch {env['torch']}, "
             f"transformers {env['transformers']}, commit {env['commit']}", ""]  # fmt: skip
    for mode in ("forward", "train"):
        rows = [r for r in records if r["mode"] == mode]
        if not rows:
            continue
        extra = sorted({row["implementation"] for r in rows for row in r.get("results", [])} - {"dense", "converted"})
        head = ["plan", "B", "T", "dense s", "FLOP ratio", "converted", "of ratio", "routing", *extra, "peak mem"]
        lines += [f"**{mode}** (speedup over dense)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            if "skipped" in r:
                lines.append(f"| | {r['batch_size']} | {r['seq_len']} | skipped: {r['skipped']} |")
                continue
            results = r["results"]
            dense = next(row for row in results if row["implementation"] == "dense")
            for conv in (row for row in results if row["implementation"] == "converted"):
                # the plan's own rows, and the plan-less ones besides dense (dense+compile)
                others = {row["implementation"]: row for row in results if row["plan"] in (conv["plan"], None)}
                share, of_ratio = conv.get("routing_share"), conv["speedup"] / conv["flop_ratio"]
                cells = [
                    conv["plan"], r["batch_size"], r["seq_len"], f"{dense['seconds']:.3f}",
                    f"{conv['flop_ratio']:.2f}x", f"{conv['speedup']:.2f}x", f"{of_ratio:.0%}",
                    f"{share:.1%}" if share is not None else "",
                    *[f"{others[e]['speedup']:.2f}x" if e in others else "" for e in extra],
                    f"{_fmt_bytes(conv['peak_memory_bytes'])} / {_fmt_bytes(dense['peak_memory_bytes'])}",
                ]  # fmt: skip
                lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


CSV_FIELDS = (
    "model", "mode", "batch_size", "seq_len", "variant", "implementation", "plan", "seconds", "speedup",
    "flop_ratio", "flops_analytic", "flops_measured", "routing_share", "peak_memory_bytes", "first_call_seconds",
    "skipped", "device", "cpu_threads", "dtype", "torch", "transformers", "triton", "commit",
)  # fmt: skip


def write_csv(path: Path, model: str, records: list[dict[str, Any]], env: dict[str, Any]) -> None:
    rows = []
    for record in records:
        base = {"model": model, **{k: record[k] for k in ("mode", "batch_size", "seq_len")}}
        if "skipped" in record:
            rows.append({**base, "skipped": record["skipped"], **env})
        for row in record.get("results", []):
            rows.append({**base, **{k: v for k, v in row.items() if k != "times"}, "variant": row["name"], **env})

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_file(path, write)


def _capacity(plan: str) -> tuple[str, float] | None:
    layers, _, cap = ("every-other@0.125" if plan == "paper" else plan).rpartition("@")
    try:
        return layers, float(cap)
    except ValueError:
        return None


def plot(path: Path, model: str, records: list[dict[str, Any]]) -> None:
    """Speedup of the converted model against capacity, per mode: one colour per sequence length (the largest
    batch that ran), solid for the measured speedup, dashed for the FLOP ratio; one marker per layer pattern."""
    # import time: matplotlib (about 0.4 s) loads only to draw the chart, on Agg (no display needed)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # import time: as matplotlib, once its backend is chosen

    modes = [m for m in ("forward", "train") if any(r["mode"] == m and "results" in r for r in records)]
    fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(6 * max(1, len(modes)), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        # (layers, T) -> capacity -> (batch, speedup, flop ratio), keeping the largest batch
        points: dict[tuple[str, int], dict[float, tuple[int, float, float]]] = {}
        for record in records:
            for row in record.get("results", []) if record["mode"] == mode else []:
                parsed = _capacity(row["plan"] or "")
                if row["implementation"] != "converted" or parsed is None:
                    continue
                slot = points.setdefault((parsed[0], record["seq_len"]), {})
                if parsed[1] not in slot or slot[parsed[1]][0] < record["batch_size"]:
                    slot[parsed[1]] = (record["batch_size"], row["speedup"], row["flop_ratio"])
        lengths = sorted({t for _, t in points})
        for (layers, length), slot in sorted(points.items()):
            caps = sorted(slot)
            color = f"C{lengths.index(length)}"
            marker = "o" if layers == "all" else "s"
            batch = "/".join(str(b) for b in sorted({b for b, _, _ in slot.values()}))
            ax.plot(caps, [slot[c][1] for c in caps], "-", marker=marker, color=color,
                    label=f"{layers}, T={length}, B={batch}: measured")  # fmt: skip
            ax.plot(caps, [slot[c][2] for c in caps], "--", marker=marker, mfc="none", color=color, alpha=0.7,
                    label=f"{layers}, T={length}: FLOP ratio")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("capacity of routed blocks")
        ax.set_ylabel("speedup over dense")
        ax.set_title(f"{model}: {mode}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    atomic_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
