"""Benchmark the routing ops against the unfused PyTorch sequence they replace.

    python benchmarks/bench_routing_ops.py                       # CPU defaults: B=2 T=1024 D=1024 float32
    python benchmarks/bench_routing_ops.py --batch 8 --seq 4096 --dim 4096 --dtype bfloat16   # the GPU target
    python benchmarks/bench_routing_ops.py --csv out.csv

Rows (op x provider): ``gather`` (top-k rows of x), ``scatter`` (gated scatter-add forward), ``scatter_bwd``
(its backward), ``routing`` (all of one routed block's routing work: router scores, top-k, gather, and the
two gated adds of a pre-norm block). Provider ``torch`` is the unfused PyTorch sequence (clone, gather,
multiply, scatter_add); ``modify`` is ``torch.ops.modify.*``: the Triton kernels on CUDA, the PyTorch
reference on CPU (so on CPU the two should tie). GB/s counts the bytes each op must move at least; on CUDA
the percent is of the device's peak memory bandwidth (table below, else a measured device copy).
Timing: ``triton.testing.do_bench`` median on CUDA, the median of repeated runs on CPU.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modify.kernels import gated_scatter_add, gather_tokens  # noqa: E402
from modify.kernels.ops import gated_scatter_add_backward  # noqa: E402
from modify.routing import select_tokens  # noqa: E402

#: Peak HBM bandwidth in GB/s by device-name substring (vendor data sheets).
PEAK_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100": 2000.0, "A100-SXM4-80GB": 2039.0, "A100": 1555.0, "L4": 300.0}


def _time(fn: Callable[[], object], device: str) -> float:
    """Median seconds per call."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0] / 1e3
    fn()
    samples = []
    deadline = time.perf_counter() + 2.0
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 50):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _torch_gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _torch_scatter(x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    return out.scatter_add_(1, idx[..., None].expand(-1, -1, x.shape[-1]), delta * gate[..., None].to(delta.dtype))


def _torch_scatter_bwd(grad: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor) -> tuple:
    rows = _torch_gather(grad, idx)
    return rows * gate[..., None].to(rows.dtype), (rows.float() * delta.float()).sum(-1)


def _peak(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_GBPS.items():
        if key in name:
            return value
    big = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    return 2 * big.numel() / _time(lambda: big.clone(), device) / 1e9


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        return "unknown"


def run(batch: int, seq: int, dim: int, capacity: float, dtype: torch.dtype, device: str) -> list[dict]:
    k = math.ceil(capacity * seq)
    size = torch.finfo(dtype).bits // 8
    x = torch.randn(batch, seq, dim, device=device, dtype=dtype)
    scores = torch.randn(batch, seq, device=device)
    idx = select_tokens(scores, k)
    delta = torch.randn(batch, k, dim, device=device, dtype=dtype)
    delta2 = torch.randn_like(delta)
    gate = torch.rand(batch, k, device=device) * 2
    weight = torch.randn(1, dim, device=device)
    rows, full = batch * k * dim * size, batch * seq * dim * size

    def routing(gather: Callable, scatter: Callable) -> Callable[[], object]:
        def step() -> object:
            r = torch.nn.functional.linear(x.float(), weight).squeeze(-1)
            sel = select_tokens(r, k)
            gather(x, sel)
            g = 2 * torch.sigmoid(torch.gather(r, 1, sel))
            return scatter(scatter(x, sel, delta, g), sel, delta2, g)

        return step

    cases = {
        "gather": (rows * 2, lambda: _torch_gather(x, idx), lambda: gather_tokens(x, idx)),
        "scatter": (
            full * 2 + rows,
            lambda: _torch_scatter(x, idx, delta, gate),
            lambda: gated_scatter_add(x, idx, delta, gate),
        ),
        "scatter_bwd": (
            rows * 3,
            lambda: _torch_scatter_bwd(x, idx, delta, gate),
            lambda: gated_scatter_add_backward(x, idx, delta, gate),
        ),
        "routing": (
            full * 5 + rows * 4,
            routing(_torch_gather, _torch_scatter),
            routing(gather_tokens, gated_scatter_add),
        ),
    }
    peak = _peak(device)
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    out = []
    for op, (nbytes, torch_fn, modify_fn) in cases.items():
        times = {"torch": _time(torch_fn, device), "modify": _time(modify_fn, device)}
        for provider, seconds in times.items():
            gbps = nbytes / seconds / 1e9
            out.append(
                {
                    "op": op,
                    "provider": provider,
                    "B": batch,
                    "T": seq,
                    "D": dim,
                    "capacity": capacity,
                    "dtype": str(dtype).removeprefix("torch."),
                    "ms": round(seconds * 1e3, 4),
                    "GB/s": round(gbps, 1),
                    "pct_peak": round(100 * gbps / peak, 1) if peak else "",
                    "speedup_vs_torch": round(times["torch"] / seconds, 3),
                    "device": name,
                    "torch": torch.__version__,
                    "triton": triton_version,
                    "commit": _git_commit(),
                }
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--batch", type=int, default=8 if cuda else 2, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=4096 if cuda else 1024, help="tokens per sequence")
    parser.add_argument("--dim", type=int, default=4096 if cuda else 1024, help="hidden size")
    parser.add_argument("--capacity", type=float, default=0.125, help="fraction of tokens routed")
    parser.add_argument(
        "--dtype", default="bfloat16" if cuda else "float32", choices=["float32", "bfloat16", "float16"]
    )
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda or cpu")
    parser.add_argument("--csv", type=Path, help="write the rows to this CSV file")
    args = parser.parse_args()
    rows = run(args.batch, args.seq, args.dim, args.capacity, getattr(torch, args.dtype), args.device)
    header = ["op", "provider", "ms", "GB/s", "pct_peak", "speedup_vs_torch"]
    print(f"{rows[0]['device']}  torch {rows[0]['torch']}  triton {rows[0]['triton']}  commit {rows[0]['commit']}")
    print(f"B={args.batch} T={args.seq} D={args.dim} c={args.capacity} {args.dtype}")
    print("  ".join(f"{h:>16}" for h in header))
    for row in rows:
        print("  ".join(f"{row[h]!s:>16}" for h in header))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
