"""Checkpoints of a training run, and the trained model it leaves in OUT.

``OUT/checkpoints/step-000100/`` is a model directory in the format ``modify convert`` writes (a dense run:
``save_pretrained``'s), loadable with ``modify.from_pretrained``, with LoRA merged into the weights; beside
the weights, ``trainer/`` holds what resuming needs: the trained parameters exactly as they were
(``trainable.safetensors``, unmerged), the optimizer (``optimizer.pt``), each process's data position and
random state (``processes.pt``) and ``state.json`` (step, counters, the run's identity and data fingerprint,
checked before resuming; local paths only as names and digests). A LoRA run also keeps its adapters in
``adapter/``. Each checkpoint is written into a hidden directory and renamed when complete, so one that is
there is whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from modify.errors import ModifyError
from modify.flops import flops
from modify.io.checkpoint import CARD_SEQ_LEN, atomic_directory, write_converted
from modify.routing.router import ROUTER_ATTR
from modify.train import distributed
from modify.train.config import TrainConfig
from modify.train.trainable import base_model, merged_state_dict

__all__ = ["save", "restore", "save_model", "check_resume", "latest"]

_FORMAT = "modify-train-checkpoint"


class Trainer(Protocol):
    """What a checkpoint saves and restores of a training run (:class:`modify.train.loop.Trainer` has it)."""

    config: TrainConfig
    d: distributed.Dist
    model: torch.nn.Module  # as trained: wrapped by DDP or sharded by FSDP2
    inner: torch.nn.Module  # the model itself
    tokenizer: Any
    converted: bool
    trainable: list[str]
    optimizer: torch.optim.Optimizer
    train_data: Any
    tokens_per_step: int
    step: int
    bad_steps: int
    skipped: int
    eval_history: list[tuple[int, float]]


def _gather(obj: Any, d: distributed.Dist) -> list[Any]:
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


#: The settings that hold local paths (the model, the data, the run directory).
_PATH_KEYS = ("model", "data", "eval_data", "out", "teacher")


def _located(value: str) -> str:
    """A local path as its name and a digest of where it is; anything else (a model id, smollm2) as it is."""
    path = Path(value).expanduser()
    if not path.exists():
        return value
    return f"{path.name}@{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"


def _portable(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with every path named by :func:`_located`: a checkpoint is a model directory that may be
    published, so it keeps no local path, yet resuming still tells one model directory from another."""
    out = dict(settings)
    for key in _PATH_KEYS:
        if isinstance(out.get(key), str) and out[key]:
            out[key] = _located(out[key])
        elif isinstance(out.get(key), list):
            out[key] = [_located(v) for v in out[key]]
    return out


def _card_flops(trainer: Trainer) -> Any:
    """The model card's FLOP count, from every process: counting runs the model, a collective under FSDP."""
    return flops(base_model(trainer.inner), CARD_SEQ_LEN) if trainer.converted else None


def _write_model(trainer: Trainer, directory: Path, state: dict[str, torch.Tensor], count: Any) -> None:
    model = base_model(trainer.inner)
    merged = dict(merged_state_dict(trainer.inner, state))  # save_pretrained drops tied keys from the dict it gets
    if trainer.converted:
        c = trainer.config
        note = (
            f"Trained with `modify train` for {trainer.step} steps ({trainer.step * trainer.tokens_per_step:,} "
            f"tokens, --train {c.train}, --lr {c.lr:g}, --router-lr {c.router_lr:g})."
        )
        write_converted(model, trainer.tokenizer, directory, state_dict=merged, trained=note, flop_count=count)
    else:
        model.save_pretrained(directory, safe_serialization=True, state_dict=merged)
        trainer.tokenizer.save_pretrained(directory)
    if hasattr(trainer.inner, "peft_config"):
        trainer.inner.save_pretrained(directory / "adapter")


def save(trainer: Trainer, path: Path) -> None:
    """Write a checkpoint (a collective: every process calls it; the main one writes)."""
    d = trainer.d
    state = distributed.full_model_state(trainer.model, d)
    optimizer = distributed.full_optimizer_state(trainer.model, trainer.optimizer, d)
    processes = _gather({"data": trainer.train_data.state_dict(), "rng": torch.get_rng_state()}, d)
    count = _card_flops(trainer)
    if d.main:
        with atomic_directory(path, force=True) as tmp:
            _write_model(trainer, tmp, state, count)
            (tmp / "trainer").mkdir()
            # and the routers' running thresholds, which the forward moves (buffers: not trainable)
            kept = [*trainer.trainable, *(k for k in state if k.endswith(f".{ROUTER_ATTR}.threshold"))]
            trainable = {k: state[k].contiguous() for k in kept}
            save_file(trainable, tmp / "trainer" / "trainable.safetensors")
            torch.save(optimizer, tmp / "trainer" / "optimizer.pt")
            torch.save(processes, tmp / "trainer" / "processes.pt")
            info = {
                "format": _FORMAT,
                "step": trainer.step,
                "bad_steps": trainer.bad_steps,
                "skipped": trainer.skipped,
                "eval_history": trainer.eval_history,
                "world_size": d.world_size,
                "run": _portable(trainer.config.run_identity()),
                "data": trainer.train_data.fingerprint(),
                "config": _portable(trainer.config.to_dict()),
            }
            (tmp / "trainer" / "state.json").write_text(json.dumps(info, indent=2) + "\n")
    d.barrier()


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint under ``out/checkpoints``."""
    found = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "trainer" / "state.json").is_file())
    return found[-1] if found else None


def check_resume(config: TrainConfig, path: Path, world_size: int, fingerprint: str) -> dict[str, Any]:
    """The checkpoint's state, after checking that it belongs to a run of these settings and data."""
    state_file = path / "trainer" / "state.json"
    if not state_file.is_file():
        raise ModifyError(
            f"{path} is not a checkpoint of 'modify train' (no trainer/state.json); give a step-* directory"
        )
    try:
        info = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModifyError(
            f"{state_file} is not valid JSON; the checkpoint is damaged: resume from an earlier one"
        ) from None
    if info.get("format") != _FORMAT:
        raise ModifyError(f"{path} is not a checkpoint of 'modify train'; give a step-* directory it wrote")
    mine = json.loads(json.dumps(_portable(config.run_identity())))
    # A key the checkpoint lacks was added later with its default (a run before distillation did not distil).
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    theirs = {k: info["run"].get(k, defaults.get(k)) for k in mine}
    differ = [k for k in mine if theirs[k] != mine[k]]
    if differ:
        k = differ[0]
        raise ModifyError(
            f"--resume {path} is from another run: its {k} is {theirs[k]!r}, this run's {mine[k]!r}; "
            "resume with the same settings or start a new --out"
        )
    if info["world_size"] != world_size:
        raise ModifyError(
            f"--resume {path} was written by {info['world_size']} process(es), this run has {world_size}; "
            "resume with the same number of processes"
        )
    if info["data"] != fingerprint:
        raise ModifyError(
            f"--resume {path} is from a run on other data (fingerprint differs); resume on the same files"
        )
    return info


def restore(trainer: Trainer, path: Path) -> None:
    d = trainer.d
    info = check_resume(trainer.config, path, d.world_size, trainer.train_data.fingerprint())
    distributed.load_model_state(trainer.model, load_file(path / "trainer" / "trainable.safetensors"), d)
    optimizer = torch.load(path / "trainer" / "optimizer.pt", weights_only=False)
    distributed.load_optimizer_state(trainer.model, trainer.optimizer, optimizer, d)
    processes = torch.load(path / "trainer" / "processes.pt", weights_only=False)
    trainer.train_data.load_state_dict(processes[d.rank]["data"])
    torch.set_rng_state(processes[d.rank]["rng"])
    trainer.step = info["step"]
    trainer.bad_steps = info["bad_steps"]
    trainer.skipped = info["skipped"]
    trainer.eval_history = [tuple(x) for x in info["eval_history"]]


def save_model(trainer: Trainer, out: Path) -> None:
    """The trained model into ``out`` itself (beside the run's metrics), each file moved in when all are written."""
    d = trainer.d
    state = distributed.full_model_state(trainer.model, d)
    count = _card_flops(trainer)
    if d.main:
        tmp = Path(tempfile.mkdtemp(prefix=".model.", suffix=".partial", dir=out))
        try:
            _write_model(trainer, tmp, state, count)
            for item in sorted(tmp.iterdir()):
                target = out / item.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(item, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    d.barrier()
