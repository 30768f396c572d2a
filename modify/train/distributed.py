"""One process or many: process groups, FSDP2 / DDP wrapping, and full state dicts for saving.

Under ``torchrun --nproc_per_node N`` the environment names the rank and world size; the process group uses
NCCL on CUDA and gloo on the CPU. FSDP2 (``fully_shard``) shards each block of the stack, its router
included (the router is a submodule of the block), then the root for the embeddings and the head; DDP
replicates. Checkpoints gather full state dicts on every rank (collectives) and rank 0 writes them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from modify.passes.find_block_stack import find_block_stack

__all__ = ["Dist", "setup", "wrap", "full_model_state", "full_optimizer_state", "load_optimizer_state"]


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on one (so that all ranks skip a bad step together)."""
        return bool(self.all_sum(torch.tensor([float(flag)], device=self.device)).item() > 0)


def setup() -> Dist:
    """The process group when launched by torchrun (``WORLD_SIZE`` > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if world <= 1:
        if torch.cuda.is_available():
            device = torch.device("cuda")
        return Dist(device=device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return Dist(dist.get_rank(), dist.get_world_size(), local, device)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist, strategy: str) -> nn.Module:
    """Shard (FSDP2, one unit per block) or replicate (DDP) ``model`` across the processes, in place."""
    if not d.enabled:
        return model
    d.strategy = "fsdp" if strategy == "auto" else strategy
    if d.strategy == "ddp":
        return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    _, stack = find_block_stack(model)
    for block in stack:
        fully_shard(block)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, DistributedDataParallel) else model


def full_model_state(model: nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """The whole model's state dict as plain CPU tensors (a collective under FSDP: call on every rank)."""
    if d.strategy == "fsdp":
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], d: Dist) -> None:
    if d.strategy == "fsdp":
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    missing, unexpected = unwrap(model).load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint has weights the model lacks: {unexpected[:3]}")


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> dict[str, Any]:
    if d.strategy == "fsdp":
        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], d: Dist) -> None:
    if d.strategy == "fsdp":
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


@contextlib.contextmanager
def no_sync(model: nn.Module, active: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on micro-steps that are not the last of a step."""
    if active and isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield
