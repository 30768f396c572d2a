"""Time, count and profile whole-model forwards and training steps, dense against converted and the baselines.

For each (batch size, sequence length) and mode, every implementation (:mod:`modify.bench.baselines`) of every
plan runs in one process on one model: first a warm-up call under ``modify.flops.flop_counter()`` (the measured
FLOPs: torch's counter, CPU attention and grouped expert matmuls included) with peak memory recorded, then
``repeats`` rounds in which each implementation runs once in turn (interleaved, so that drifting clocks and
caches hit them alike); the reported time is the median. A training step is forward, backward and an AdamW
step over all trainable parameters.

The routing share is the converted model's time in routing work (router, top-k, gathers, gated scatter-adds,
their backward) over its whole step, from one ``torch.profiler`` run: each routed block's time minus its Δ
graph's, plus the routing ops' backward (:func:`profile_step`; with ``profile_dense`` the dense model's step
is profiled alike, so that a shortfall shows where the time goes). Settings run smallest first; one whose
projected memory (from the bytes per token the smaller ones took) exceeds the budget is skipped and says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from torch import nn

from modify.api import routed_blocks
from modify.bench.baselines import IMPLEMENTATIONS, implementation
from modify.bench.models import BenchPlan, apply_plan
from modify.flops import flop_counter, flops

__all__ = ["BenchSettings", "run_bench", "planned_calls", "profile_step", "MODES"]

MODES = ("forward", "train")
#: The routing ops' backward, which runs outside the routed blocks' forward (see the module docstring).
_ROUTING_BACKWARD = ("modify::gated_scatter_add_backward", "modify::scatter_tokens")


@dataclass
class BenchSettings:
    batch_sizes: list[int]
    seq_lens: list[int]
    modes: tuple[str, ...] = MODES
    implementations: tuple[str, ...] = IMPLEMENTATIONS
    repeats: int = 3
    compile: bool = False
    profile: bool = True
    profile_dense: bool = False
    memory_budget: int = 0  # bytes; 0: no projection check
    seed: int = 0
    lr: float = 1e-6
    on_progress: Callable[[str, int], None] | None = field(default=None, repr=False)


@dataclass
class _Variant:
    name: str  # "dense", "converted@paper", "masked@all@0.125", "converted+compile@paper", ...
    implementation: str
    plan: BenchPlan | None
    compiled: bool = False
    times: list[float] = field(default_factory=list)
    measured_flops: int = 0
    peak_memory: int = 0
    first_call_s: float = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    return psutil.Process().memory_info().rss


@contextlib.contextmanager
def _peak_memory(device: torch.device) -> Iterator[list[int]]:
    """Yields a one-item list that holds, afterwards, the call's peak memory above its start: allocated bytes on
    CUDA; on CPU the resident set, sampled every 2 ms (freed heap returned to the system first)."""
    result = [0]
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        result[0] = torch.cuda.max_memory_allocated(device) - base
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result[0] = max(peak[0], _rss()) - base


def _step(model: nn.Module, ids: torch.Tensor, mode: str, optimizer: torch.optim.Optimizer | None) -> None:
    if mode == "forward":
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        return
    assert optimizer is not None
    optimizer.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()


@contextlib.contextmanager
def _running(model: nn.Module, variant: _Variant) -> Iterator[None]:
    if variant.plan is not None:
        apply_plan(model, variant.plan)
    with implementation(model, variant.implementation):
        yield


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's C++ side logs its start and stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def profile_step(
    model: nn.Module, call: Callable[[], None], device: torch.device, blocks: set[int]
) -> dict[str, float]:
    """Where one profiled ``call`` spends its time, in seconds: ``step`` (all of it), ``blocks`` (the routed
    blocks numbered in ``blocks``, their routing included), ``compute`` (their Δ graphs, or their whole forward
    when they run densely) and ``routing`` (blocks minus compute, plus the routing ops' backward). On CUDA,
    device time."""
    routed = [(block, state) for block, state in routed_blocks(model) if state.index in blocks]
    saved = [
        (block.forward, dict(state.graphs), dict(state.program.splits), state.forward_fn) for block, state in routed
    ]

    def ranged(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)

        return run

    for block, state in routed:
        block.forward = ranged("bench::block", block.forward)  # type: ignore[method-assign]
        state.graphs = {k: ranged("bench::compute", gm) for k, gm in state.graphs.items()}  # type: ignore[misc]
        state.program.splits = {  # kv="all": both sides of the split are the block's compute
            k: dataclasses.replace(s, kv=ranged("bench::compute", s.kv), query=ranged("bench::compute", s.query))
            for k, s in state.program.splits.items()
        }
        state.forward_fn = ranged("bench::compute", state.forward_fn)  # a disabled block's dense forward
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with _quiet_stderr(), torch.profiler.profile(activities=activities) as prof:
            with torch.profiler.record_function("bench::step"):
                call()
            _sync(device)
    finally:
        for (block, state), (forward, graphs, splits, forward_fn) in zip(routed, saved):
            block.forward = forward  # type: ignore[method-assign]
            state.graphs, state.program.splits, state.forward_fn = graphs, splits, forward_fn
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    totals = {e.key: getattr(e, attr) / 1e6 for e in prof.key_averages()}
    backward = sum(totals.get(k, 0.0) for k in _ROUTING_BACKWARD)
    block, compute = totals.get("bench::block", 0.0), totals.get("bench::compute", 0.0)
    return {"step": totals.get("bench::step", 0.0), "blocks": block + backward, "compute": compute,
            "routing": block - compute + backward}  # fmt: skip


def _variants(plans: list[BenchPlan], settings: BenchSettings) -> list[_Variant]:
    out = [_Variant("dense", "dense", None)] if "dense" in settings.implementations else []
    for plan in plans:
        out += [_Variant(f"{i}@{plan.label}", i, plan) for i in settings.implementations if i != "dense"]
    if settings.compile:
        out.append(_Variant("dense+compile", "dense", None, compiled=True))
        out += [_Variant(f"converted+compile@{p.label}", "converted", p, compiled=True) for p in plans]
    return out


def _analytic(model: nn.Module, plan: BenchPlan | None, seq_len: int, batch: int) -> tuple[int, int]:
    """(dense, routed) forward FLOPs of the model running ``plan`` (the converted model as configured)."""
    if plan is None:
        count = flops(model, seq_len, batch)
        return count.dense, count.dense
    apply_plan(model, plan)
    count = flops(model, seq_len, batch)
    return count.dense, count.routed


def planned_calls(plans: list[BenchPlan], settings: BenchSettings) -> int:
    """How many timed or warm-up calls :func:`run_bench` makes (settings the memory guard skips included)."""
    cases = len(settings.batch_sizes) * len(settings.seq_lens) * len(settings.modes)
    return cases * len(_variants(plans, settings)) * (1 + settings.repeats)


def run_bench(model: nn.Module, plans: list[BenchPlan], settings: BenchSettings) -> list[dict[str, Any]]:
    """Benchmark the converted ``model`` (routed on every block any plan uses); one record per setting×mode.

    Plans switch the routed blocks' capacities, kv options and on/off state while it runs; they are restored after.
    """
    saved = [(state, state.enabled, state.capacity, state.kv) for _, state in routed_blocks(model)]
    try:
        return _run(model, plans, settings)
    finally:
        for state, enabled, capacity, kv in saved:
            state.enabled, state.capacity, state.kv = enabled, capacity, kv


def _run(model: nn.Module, plans: list[BenchPlan], settings: BenchSettings) -> list[dict[str, Any]]:
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    optimizer = None
    if "train" in settings.modes:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    compiled = None
    if settings.compile:
        torch._dynamo.config.recompile_limit = 1024  # one graph per shape, mode, plan and implementation
        torch._dynamo.config.accumulated_recompile_limit = 4096
        compiled = torch.compile(model, dynamic=False)
    bytes_per_token: dict[str, float] = {}
    records = []
    cases = sorted(((b, t) for b in settings.batch_sizes for t in settings.seq_lens), key=lambda c: (c[0] * c[1], c))
    gen = torch.Generator().manual_seed(settings.seed)
    for batch, seq_len in cases:
        ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
        for mode in settings.modes:
            record: dict[str, Any] = {"batch_size": batch, "seq_len": seq_len, "mode": mode}
            records.append(record)
            tokens = batch * seq_len
            projected = bytes_per_token.get(mode, 0.0) * tokens * 1.15
            if settings.memory_budget and projected > settings.memory_budget:
                record["skipped"] = (
                    f"projected {projected / 2**30:.1f} GiB (from smaller settings) exceeds the "
                    f"{settings.memory_budget / 2**30:.1f} GiB budget"
                )
                continue
            model.train(mode == "train")
            if mode == "train" and optimizer is not None and not optimizer.state:
                _step(model, ids, mode, optimizer)  # AdamW makes its state on the first step: not in a measurement
            variants = _variants(plans, settings)
            for v in variants:
                _report(settings, f"{mode} B={batch} T={seq_len} warm-up {v.name}", 1)
                runner = compiled if v.compiled else model
                call = _caller(runner, ids, mode, optimizer)
                with _running(model, v), _peak_memory(device) as peak:
                    start = time.perf_counter()
                    if v.compiled:  # the first call compiles; the flop counter would only see dynamo's graph
                        call()
                    else:
                        with flop_counter() as counter:
                            call()
                        v.measured_flops = counter.get_total_flops()
                    _sync(device)
                    v.first_call_s = time.perf_counter() - start
                v.peak_memory = peak[0]
            bytes_per_token[mode] = max(bytes_per_token.get(mode, 0.0), max(v.peak_memory for v in variants) / tokens)
            for _ in range(settings.repeats):
                for v in variants:
                    _report(settings, f"{mode} B={batch} T={seq_len} {v.name}", 1)
                    call = _caller(compiled if v.compiled else model, ids, mode, optimizer)
                    with _running(model, v):
                        _sync(device)
                        start = time.perf_counter()
                        call()
                        _sync(device)
                        v.times.append(time.perf_counter() - start)
            profiles: dict[str, dict[str, dict[str, float]]] = {}
            if settings.profile and "converted" in settings.implementations:
                for plan in plans:
                    _report(settings, f"{mode} B={batch} T={seq_len} profiling {plan.label}", 0)
                    apply_plan(model, plan)
                    call = _caller(model, ids, mode, optimizer)
                    profiles[plan.label] = {"converted": profile_step(model, call, device, set(plan.capacities))}
                    if settings.profile_dense:
                        with implementation(model, "dense"):
                            profiles[plan.label]["dense"] = profile_step(model, call, device, set(plan.capacities))
            record["results"] = _results(model, variants, profiles, seq_len, batch)
    return records


def _caller(model: Any, ids: torch.Tensor, mode: str, optimizer: torch.optim.Optimizer | None) -> Callable[[], None]:
    return lambda: _step(model, ids, mode, optimizer)


def _report(settings: BenchSettings, text: str, advance: int) -> None:
    if settings.on_progress is not None:
        settings.on_progress(text, advance)


def _results(
    model: nn.Module,
    variants: list[_Variant],
    profiles: dict[str, dict[str, dict[str, float]]],
    seq_len: int,
    batch: int,
) -> list[dict[str, Any]]:
    dense = next((v for v in variants if v.name == "dense"), None)
    dense_time = statistics.median(dense.times) if dense is not None else float("nan")
    out = []
    for v in variants:
        median = statistics.median(v.times)
        analytic_dense, analytic = _analytic(model, v.plan, seq_len, batch)
        if v.implementation == "masked":
            analytic = analytic_dense  # every token through every block
        row = {
            "name": v.name,
            "implementation": v.implementation + ("+compile" if v.compiled else ""),
            "plan": v.plan.label if v.plan is not None else None,
            "seconds": median,
            "times": v.times,
            "speedup": dense_time / median,
            "flops_analytic": analytic,
            "flop_ratio": analytic_dense / analytic,
            "flops_measured": v.measured_flops,
            "peak_memory_bytes": v.peak_memory,
            "first_call_seconds": v.first_call_s,
        }
        if v.implementation == "converted" and not v.compiled and v.plan is not None:
            profile = profiles.get(v.plan.label)
            if profile is not None:
                converted = profile["converted"]
                row["routing_share"] = converted["routing"] / converted["step"] if converted["step"] else None
                row["profile"] = profile
        out.append(row)
    return out
