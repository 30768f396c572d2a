"""``modify train`` on a model converted with ``kv="all"``: distillation, exact resume after a kill, FSDP2 under
torchrun, and the key/value projections learning from the tokens a block skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import modify
from modify.api import routed_blocks
from modify.cli import main
from modify.train.report import read_metrics
from tests.train.conftest import train_args
from tests.train.test_train_cli import killed_run


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _block_call(model: torch.nn.Module, block: torch.nn.Module, ids: torch.Tensor) -> tuple[tuple, dict]:
    seen: dict = {}
    handle = block.register_forward_pre_hook(lambda m, a, kw: seen.update(args=a, kwargs=kw), with_kwargs=True)
    with torch.no_grad():
        model(ids, use_cache=False)
    handle.remove()
    return seen["args"], seen["kwargs"]


def test_skipped_tokens_send_gradient_through_keys_and_values(tiny_run: dict[str, Path]) -> None:
    """Backpropagating the block's Δ at its routed tokens: with kv='all' the skipped tokens' inputs get gradient
    (their keys and values feed the routed tokens), with kv='routed' none."""
    grads = {}
    for kv in ("all", "converted"):
        model = modify.from_pretrained(tiny_run["kv_all" if kv == "all" else "converted"]).train()
        block = model.model.layers[1]
        args, kwargs = _block_call(
            model, block, torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(1))
        )
        x = kwargs.pop("hidden_states", None)
        x = (x if x is not None else args[0]).detach().clone().requires_grad_(True)
        picked: list[torch.Tensor] = []
        state = routed_blocks(model)[0][1]
        state.observer = lambda scores, idx, gate, picked=picked: picked.append(idx)
        out = block(x, *args[1:], **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        idx = picked[0][0]
        (y - x)[0, idx].sum().backward()
        skipped = torch.ones(16, dtype=torch.bool)
        skipped[idx] = False
        grads[kv] = x.grad[0, skipped].abs().sum()
    assert grads["all"] > 0 and grads["converted"] == 0


def test_distill_and_exact_resume(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    args = ["--steps", "5", "--save-every", "2", "--train", "full", "--distill"]
    assert main(train_args(tiny_run, tmp_path / "straight", *args, model="kv_all")) == 0
    killed = killed_run_kv(tiny_run, tmp_path, args)
    assert main(train_args(tiny_run, killed, *args, "--resume", model="kv_all")) == 0
    straight, resumed = read_metrics(tmp_path / "straight" / "metrics.csv"), read_metrics(killed / "metrics.csv")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    a, b = _weights(tmp_path / "straight"), _weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = _weights(tiny_run["kv_all"])
    assert not torch.equal(
        before["model.layers.1.self_attn.k_proj.weight"], a["model.layers.1.self_attn.k_proj.weight"]
    )
    loaded = modify.from_pretrained(tmp_path / "straight")
    assert [s.kv for _, s in routed_blocks(loaded)] == ["all", "all"]


def killed_run_kv(tiny_run: dict[str, Path], tmp_path: Path, args: list[str]) -> Path:
    runs = {**tiny_run, "converted": tiny_run["kv_all"]}
    return killed_run(runs, tmp_path, args, kill_at=4)


def test_fsdp_under_torchrun(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fsdp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m",
           "modify", *train_args(tiny_run, out, "--strategy", "fsdp", model="kv_all")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = modify.from_pretrained(out)
    assert [s.kv for _, s in routed_blocks(model)] == ["all", "all"]
    assert len(read_metrics(out / "metrics.csv")) == 4
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 97, (1, 12))).logits).all()
