"""The continued-pretraining loop behind ``modify train``: setup, steps, evaluation, checkpoints, the end.

One step: ``grad_accum`` micro-batches of ``batch_size`` packed sequences per process, each a forward under
autocast (bfloat16 where the hardware has it) with ``labels = input_ids``, the language-model loss plus
``aux_weight`` times any auxiliary loss the model returns, backward; then gradient clipping and one AdamW step.
A step whose loss or gradient is not finite on any process is skipped on all of them (the optimizer does
not move) with a warning; ``max_bad_steps`` in a row stop the run with an error. Routers stay float32.

Resuming (``--resume``) restores the trained weights, the optimizer, the learning-rate schedule, the data
position and the random state of the checkpoint, so the resumed run's losses equal an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from modify.api import is_converted, revert, routed_blocks
from modify.errors import ModifyError
from modify.flops import flops
from modify.io.checkpoint import load_any
from modify.model_hooks import aux_loss_coef
from modify.train import checkpoints, distributed
from modify.train.config import TrainConfig
from modify.train.data import PackedStream, collect_files
from modify.train.distill import Teacher, block_outputs, distill_loss, hidden_loss, trained_by, vocabulary_check
from modify.train.evaluate import evaluate
from modify.train.report import MetricsLog, plot_report
from modify.train.stats import RoutingMonitor
from modify.train.trainable import _is_router, _is_skip_path, base_model, param_groups, prepare_trainable

__all__ = ["Trainer", "autocast_dtype", "lr_factor"]


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The compute dtype under autocast: None for none (no autocast)."""
    if name == "none":
        return None
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    # CPUs with AVX512-BF16 or AMX run bfloat16 matmuls natively; elsewhere emulated bfloat16 is slower.
    return (
        torch.bfloat16
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        else None
    )


def lr_factor(step: int, total: int, warmup: int, schedule: str, floor: float = 0.1) -> float:
    """Multiplier of the peak learning rate at ``step`` (1-based): linear warm-up, then decay to ``floor``."""
    if warmup > 0 and step <= warmup:
        return step / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Trainer:
    """A training run: ``Trainer(config, ...).run()``. See :mod:`modify.cli.train` for the files it writes.

    Args:
        config: the resolved settings.
        resume: a checkpoint directory written by an earlier run of the same settings, or None.
        log: prints a line (to stderr and OUT/train.log, on the main process).
        progress: draw a progress bar (a terminal on the main process).
    """

    def __init__(
        self,
        config: TrainConfig,
        resume: Path | None = None,
        log: Callable[[str], None] = print,
        progress: bool = False,
        verbose_load: bool = False,
    ) -> None:
        self.config = config
        self.resume = resume
        self.log = log
        self.show_progress = progress
        self.verbose_load = verbose_load
        self.out = Path(config.out)

    # -- setup ------------------------------------------------------------------------------------------------
    def setup(self, d: distributed.Dist) -> None:
        c = self.config
        self.d = d
        # transformers' GGUF loader draws its own progress bar on stderr, whatever its verbosity.
        with contextlib.nullcontext() if self.verbose_load else contextlib.redirect_stderr(io.StringIO()):
            model, tokenizer, self.source, converted = load_any(c.model, c.dtype)
        if tokenizer is None:
            raise ModifyError(f"{c.model} has no tokenizer; save one beside the model (tokenizer.save_pretrained)")
        self.tokenizer = tokenizer
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.converted = converted
        self.plan_capacities = {state.index: state.capacity for _, state in routed_blocks(model)}
        model.to(d.device)
        self.monitor = RoutingMonitor(model, warn=self.log) if converted else None
        torch.manual_seed(c.seed)
        model = prepare_trainable(model, c.train, c.lora_rank, c.lora_alpha)
        model.train()
        self.trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        strategy = "ddp" if c.train == "lora" and c.strategy == "auto" else c.strategy
        if c.train == "lora" and strategy == "fsdp" and d.enabled:
            raise ModifyError("--train lora runs under DDP, not FSDP: pass --strategy ddp (or auto)")
        self.model = distributed.wrap(model, d, strategy)
        self.inner = distributed.unwrap(self.model)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.inner, c.lr, c.router_lr, c.weight_decay), betas=(0.9, 0.95), eps=1e-8, foreach=False
        )
        files = collect_files(c.data)
        self.train_data = PackedStream(
            files, tokenizer, c.seq_len, seed=c.seed, split=c.train_split,
            eval_fraction=c.eval_fraction, rank=d.rank, world_size=d.world_size,
        )  # fmt: skip
        eval_files = collect_files(c.eval_data) if c.eval_data else (files if c.held_out else [])
        self.make_eval_data: Callable[[], Any] | None = None
        if eval_files:
            split = "eval" if c.held_out else "all"

            def make_eval_data() -> Any:
                return PackedStream(
                    eval_files, tokenizer, c.seq_len, seed=c.seed, split=split, eval_fraction=c.eval_fraction,
                    rank=d.rank, world_size=d.world_size, loop=False, shuffle=False,
                )  # fmt: skip

            self.make_eval_data = make_eval_data
            held_out = make_eval_data()  # an empty or too short held-out split is an error now, not after training
            note = held_out.held_out_note() if d.main else None  # a split by windows says so: it is not by document
            if note:
                self.log(note)
        per_step = c.batch_size * c.seq_len * c.grad_accum * d.world_size
        self.tokens_per_step = per_step
        self.total_steps = c.steps if c.steps is not None else max(1, math.ceil(c.tokens / per_step))
        self.warmup = c.warmup_steps(self.total_steps)
        self.amp = autocast_dtype(c.autocast, d.device)
        self.step = 0
        self.bad_steps = 0
        self.skipped = 0
        self.eval_history: list[tuple[int, float]] = []
        self.teacher = self._make_teacher(model, tokenizer) if c.distill else None

    def _make_teacher(self, model: torch.nn.Module, tokenizer: Any) -> Any:
        """The conversion's source to distil from (see :class:`modify.train.distill.Teacher`)."""
        c = self.config
        moved = trained_by(c.model) if not c.teacher else ""
        if moved:
            raise ModifyError(
                f"{c.model} was written by modify train --train {moved}, which moved its base weights, so neither it "
                "with routing off nor a copy of it is the conversion's source; pass --teacher SRC (the checkpoint it "
                "was converted from)"
            )
        if not c.teacher and c.train != "full":
            # Only routers, skip paths, adapters (and norms, put back for the teacher) move: the student with
            # routing and adapters off is the original model, with no second copy of its weights.
            restore = [
                p for name, p in self.inner.named_parameters()
                if p.requires_grad and not (_is_router(name) or _is_skip_path(name) or ".lora_" in name)
            ]  # fmt: skip
            self.log(
                f"distilling from the model itself with routing off ({len(restore)} trained norm tensors put back)"
            )
            return Teacher(self.inner, restore=restore)
        name = c.teacher or c.model
        with contextlib.nullcontext() if self.verbose_load else contextlib.redirect_stderr(io.StringIO()):
            frozen, teacher_tokenizer, _, _ = load_any(name, c.dtype)
        if is_converted(frozen):
            revert(frozen)
        vocabulary_check(base_model(self.inner), frozen, tokenizer, teacher_tokenizer, name)
        frozen.to(self.d.device)
        self.log(f"distilling from a frozen copy of {'--teacher' if c.teacher else 'the source'}")
        return Teacher(self.inner, frozen=frozen)

    # -- one step ---------------------------------------------------------------------------------------------
    def _set_capacity(self, step: int | None) -> None:
        """Capacities at ``step`` of the anneal; ``None``: the plan's (what evaluation and the saved model use)."""
        anneal = self.config.capacity_anneal
        share = 1.0 if anneal == 0 or step is None else min(1.0, step / anneal)
        for _, state in routed_blocks(self.inner):
            plan = self.plan_capacities[state.index]
            state.capacity = 1.0 - (1.0 - plan) * share

    def _set_relaxed(self, on: bool) -> None:
        for _, state in routed_blocks(self.inner):
            state.relaxed = on

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the loss to train on, its parts detached: lm, and aux, kd, hidden where there are) of one micro-batch."""
        with torch.autocast(self.d.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            if self.teacher is not None:
                return self._distill_forward(batch)
            out = self.model(input_ids=batch, labels=batch)
        aux = getattr(out, "aux_loss", None)
        lm = getattr(out, "lm_loss", None)
        parts = {} if aux is None else {"aux": aux.detach()}
        if lm is not None:  # the model added its auxiliary loss itself (causal routing, modify.routing.rules)
            return out.loss, {"lm": lm.detach(), **parts}
        return out.loss if aux is None else out.loss + self.config.aux_weight * aux, {"lm": out.loss.detach(), **parts}

    def _distill_forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        hidden = c.distill_hidden > 0
        assert self.teacher is not None
        teacher = self.teacher(self.model, batch, hidden=hidden)
        # Only the stream is needed after the loss: the teacher's logits go with this reference (the loss
        # saves none of them for backward), before the student's hidden-state term.
        reference, teacher_hidden = teacher.logits, teacher.hidden_states if hidden else None
        del teacher
        out = self.model(input_ids=batch, use_cache=False, **({"output_hidden_states": True} if hidden else {}))
        distilled = distill_loss(out.logits, reference, batch, c.distill_weight, c.distill_temperature)
        del reference
        loss = distilled.loss
        parts = {"lm": distilled.lm, "kd": distilled.kd}
        if hidden:
            blocks = sorted(self.plan_capacities)
            term = hidden_loss(block_outputs(out.hidden_states, blocks), block_outputs(teacher_hidden, blocks))
            loss = loss + c.distill_hidden * term
            parts["hidden"] = term.detach()
        aux = getattr(out, "aux_loss", None)
        if aux is not None:
            coef = aux_loss_coef(base_model(self.inner))
            loss = loss + (c.aux_weight if coef is None else coef) * aux
            parts["aux"] = aux.detach()
        return loss, parts

    def train_step(self, batches: Iterator[torch.Tensor]) -> dict[str, float]:
        c, d = self.config, self.d
        factor = lr_factor(self.step + 1, self.total_steps, self.warmup, c.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        self._set_capacity(self.step + 1)
        self._set_relaxed(self.step < c.router_phase)
        totals: dict[str, torch.Tensor] = {}
        for micro in range(c.grad_accum):
            batch = next(batches).to(d.device)
            if micro == 0 and self.step == 0 and int(batch.max()) >= self.vocab_size:
                raise ModifyError(
                    f"the tokenizer gives token id {int(batch.max())} but the model's vocabulary has {self.vocab_size} "
                    "entries; use the model's own tokenizer"
                )
            with distributed.no_sync(self.model, micro < c.grad_accum - 1):
                loss, parts = self._forward(batch)
                (loss / c.grad_accum).backward()
            for key, value in parts.items():
                totals[key] = totals.get(key, torch.zeros((), device=d.device)) + value.float() / c.grad_accum
        # Every rank has the same parts (the same model and loss), so one all-reduce carries them all.
        keys = [k for k in ("lm", "aux", "kd", "hidden") if k in totals]
        means = d.all_sum(torch.stack([totals[k] for k in keys])) / d.world_size
        mean = dict(zip(keys, (float(v) for v in means.tolist())))
        lm_mean = mean["lm"]
        bad = d.any(not all(math.isfinite(v) for v in mean.values()))
        grad_norm = math.nan
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not bad:
            norm = torch.nn.utils.clip_grad_norm_(params, c.clip if c.clip > 0 else math.inf)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            bad = d.any(not math.isfinite(grad_norm))
        self.step += 1
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            self.skipped += 1
            self.log(
                f"step {self.step}: non-finite {'loss' if not math.isfinite(lm_mean) else 'gradient'}; "
                f"step skipped ({self.bad_steps} in a row)"
            )
            if self.bad_steps >= c.max_bad_steps:
                raise ModifyError(
                    f"{self.bad_steps} steps in a row had a non-finite loss or gradient (last at step {self.step}); "
                    "training stopped: lower --lr / --router-lr, keep --clip on, or use --capacity-anneal"
                )
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps = 0
        row = {"step": self.step, "tokens": self.step * self.tokens_per_step, "lr": c.lr * factor,
               "router_lr": c.router_lr * factor, "loss": lm_mean, "aux_loss": mean.get("aux", math.nan),
               "kd_loss": mean.get("kd", math.nan), "hidden_loss": mean.get("hidden", math.nan),
               "grad_norm": grad_norm, "skipped": float(bad)}  # fmt: skip
        if self.monitor is not None:
            row.update(self.monitor.end_step(self.step))
        return row

    def evaluate(self) -> tuple[float, float]:
        """Held-out (perplexity, KL to the teacher: nan without --distill)."""
        assert self.make_eval_data is not None
        c = self.config
        batches = max(1, c.eval_tokens // (c.batch_size * c.seq_len * self.d.world_size))
        self._set_capacity(None)
        teacher = self.teacher
        with self.monitor.paused() if self.monitor is not None else contextlib.nullcontext():
            result = evaluate(
                self.model, self.make_eval_data().batches(c.batch_size), autocast_dtype=self.amp,
                max_batches=batches, reduce=self.d.all_sum,
                teacher=None if teacher is None else lambda ids: teacher(self.model, ids).logits,
            )  # fmt: skip
        self.model.train()
        self.eval_history.append((self.step, result.ppl))
        return result.ppl, result.kl

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        d = distributed.setup()
        try:
            self.setup(d)
            c = self.config
            if self.resume is not None:
                checkpoints.restore(self, self.resume)
                self.log(f"resumed from {self.resume} at step {self.step}")
            blocks = self.monitor.blocks if self.monitor is not None else []
            metrics = MetricsLog(self.out, blocks, d.main, keep_until=self.step if self.resume else 0)
            batches = self.train_data.batches(c.batch_size)
            bar = _Bar(self.show_progress and d.main, self.total_steps, self.step)
            start, start_step = time.perf_counter(), self.step
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                row = self.train_step(batches)
                row["tokens_per_second"] = self.tokens_per_step / (time.perf_counter() - t0)
                row["elapsed"] = time.perf_counter() - start
                last = self.step == self.total_steps
                if self.make_eval_data is not None and ((c.eval_every and self.step % c.eval_every == 0) or last):
                    row["eval_ppl"], row["eval_kl"] = self.evaluate()
                metrics.write(row)
                done = self.step - start_step
                remaining = (self.total_steps - self.step) * row["elapsed"] / max(1, done)
                bar.update(self.step, row, remaining)
                if not bar.enabled and c.log_every and (self.step % c.log_every == 0 or last):
                    self.log(_line(row, self.total_steps, remaining))
                if c.save_every and self.step % c.save_every == 0 and not last:
                    checkpoints.save(self, self.out / "checkpoints" / f"step-{self.step:06d}")
            bar.close()
            summary = self.finish(metrics)
            plot_report(self.out, metrics, d.main)
            metrics.close()
            return summary
        finally:
            if self.monitor is not None:
                self.monitor.close()
            # DDP's reducer holds the process group: freed after the group is destroyed, its gloo destructor
            # joins a worker thread that waits for the GIL the freeing thread holds (a hang, or an abort, in
            # about one run of 25). Drop the wrapper first, so the group goes down inside destroy_process_group.
            self.model = getattr(self, "inner", None)
            gc.collect()
            distributed.teardown(d)

    def finish(self, metrics: Any) -> dict[str, Any]:
        """Write the trained model into OUT (convert's format; LoRA merged, adapters in OUT/adapter)."""
        self._set_capacity(None)
        checkpoints.save_model(self, self.out)
        c = self.config
        count = flops(base_model(self.inner), c.seq_len)
        rows = metrics.rows
        measured = [r["tokens_per_second"] for r in rows[1:]] or [r["tokens_per_second"] for r in rows]
        return {
            "out": str(self.out.resolve()),
            "steps": self.step,
            "tokens": self.step * self.tokens_per_step,
            "skipped_steps": self.skipped,
            "final_loss": rows[-1]["loss"] if rows else math.nan,
            "eval_ppl": self.eval_history[-1][1] if self.eval_history else None,
            "tokens_per_second": sorted(measured)[len(measured) // 2] if measured else None,
            "flops_per_token": count.routed / c.seq_len,
            "dense_flops_per_token": count.dense / c.seq_len,
            "train": c.train,
            "world_size": self.d.world_size,
        }


def _line(row: dict[str, float], total: int, remaining: float) -> str:
    text = f"step {row['step']}/{total}  loss {row['loss']:.4f}  {row['tokens_per_second']:.0f} tok/s"
    if math.isfinite(row.get("kd_loss", math.nan)):
        text += f"  kd {row['kd_loss']:.4f}"
    if "eval_ppl" in row:
        text += f"  eval ppl {row['eval_ppl']:.2f}"
    if math.isfinite(row.get("eval_kl", math.nan)):
        text += f"  eval kl {row['eval_kl']:.4f}"
    return text + f"  {remaining:.0f} s left"


class _Bar:
    """A rich progress bar with loss, tokens per second and time left; a no-op off a terminal."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        if not self.enabled:
            return
        self.progress = Progress(
            TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), transient=True,
        )  # fmt: skip
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=done, info="")

    def update(self, step: int, row: dict[str, float], remaining: float) -> None:
        if self.enabled:
            info = f"loss {row['loss']:.4f}  {row['tokens_per_second']:.0f} tok/s"
            self.progress.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
