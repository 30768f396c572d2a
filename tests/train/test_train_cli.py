"""``modify train`` end to end on a tiny llama: outputs, exact resume after a kill, torchrun, train modes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import modify
from modify.cli import main
from modify.train.report import read_metrics
from tests.train.conftest import train_args


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_train_writes_a_loadable_model_metrics_and_report(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(train_args(tiny_run, out, "--save-every", "2")) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "metrics.csv", "report.png",
                 "train_config.yaml", "train.log"):  # fmt: skip
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "step-000002" / "trainer" / "state.json").is_file()
    model = modify.from_pretrained(out)
    routed = [(b.index, b.capacity) for b in modify.find_blocks(model) if b.routed]
    assert routed == [(1, 0.5), (3, 0.5)]
    before, after = _weights(tiny_run["converted"]), _weights(out)
    assert not torch.equal(before["model.layers.1.mod_router.weight"], after["model.layers.1.mod_router.weight"])
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(0 < r["gate_1"] < 2 and 0 < r["entropy_3"] <= 1 + 1e-6 for r in rows)
    assert 0 <= rows[-1]["overlap_1"] <= 1 and rows[-1]["eval_ppl"] > 1
    # the saved settings run again as a config file
    again = tmp_path / "again"
    assert main(["train", "--config", str(out / "train_config.yaml"), "--out", str(again), "-q"]) == 0
    assert [r["loss"] for r in read_metrics(again / "metrics.csv")] == [r["loss"] for r in rows]


def test_one_text_file_trains_on_windows_and_evaluates_on_others(
    tiny_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    from modify.train.data import PackedStream, held_out_window

    play = tmp_path / "play.txt"
    play.write_text(" ".join(f"{i:04d}" for i in range(1000)) + "\n")  # every 16-token window is distinct
    seen: dict[str, set[tuple[int, ...]]] = {"train": set(), "eval": set()}
    batches = PackedStream.batches

    def spy(self: PackedStream, *args: Any, **kwargs: Any) -> Iterator[torch.Tensor]:
        for batch in batches(self, *args, **kwargs):
            seen[self.split].update(tuple(row) for row in batch.tolist())
            yield batch

    monkeypatch.setattr(PackedStream, "batches", spy)
    out = tmp_path / "run"
    argv = ["train", str(tiny_run["converted"]), "--data", str(play), "--out", str(out), "--steps", "3",
            "--seq-len", "16", "--batch-size", "2", "--dtype", "float32"]  # fmt: skip
    assert main(argv) == 0  # the default --eval-fraction, and one file is one document
    tokenizer = AutoTokenizer.from_pretrained(out)
    windows = [tuple(s.tolist()) for s in PackedStream([play], tokenizer, 16, loop=False, shuffle=False)]
    held = {w for i, w in enumerate(windows) if held_out_window(i, 0.05)}
    assert seen["eval"] == held and len(held) == math.ceil(len(windows) * 0.05)  # each held-out one evaluated
    assert len(seen["train"]) == 3 * 2 and not seen["train"] & held and seen["train"] <= set(windows)
    note = f"eval split: {len(held)} of {len(windows)} token windows held out ({16 * len(held)} tokens), by window"
    assert note in (out / "train.log").read_text()
    assert read_metrics(out / "metrics.csv")[-1]["eval_ppl"] > 1


_KILLER = """
import os, signal, sys
from modify.train import loop
step = loop.Trainer.train_step
def killed(self, batches):
    row = step(self, batches)
    if self.step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return row
loop.Trainer.train_step = killed
from modify.cli import main
sys.exit(main(sys.argv[1:]))
"""


def killed_run(tiny_run: dict[str, Path], tmp_path: Path, args: list[str], kill_at: int) -> Path:
    """The run directory of ``modify train ... args`` killed by SIGKILL inside step ``kill_at``."""
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(_KILLER.format(kill_at=kill_at)))
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(script), *train_args(tiny_run, killed, *args)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-500:]
    return killed


def test_resume_after_kill_continues_exactly(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    args = ["--steps", "7", "--save-every", "2", "--train", "full"]
    assert main(train_args(tiny_run, tmp_path / "straight", *args)) == 0
    killed = killed_run(tiny_run, tmp_path, args, kill_at=6)
    assert not (killed / "model.safetensors").exists()  # it died before the end
    # killed inside step 6: steps 1-5 logged, the last checkpoint at step 4
    assert len(read_metrics(killed / "metrics.csv")) == 5
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert main(train_args(tiny_run, killed, *args, "--resume")) == 0
    straight, resumed = read_metrics(tmp_path / "straight" / "metrics.csv"), read_metrics(killed / "metrics.csv")
    assert [r["step"] for r in resumed] == list(range(1, 8))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight]
    a, b = _weights(tmp_path / "straight"), _weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_torchrun_two_processes_train_save_and_reload(tiny_run: dict[str, Path], tmp_path: Path, strategy: str) -> None:
    out = tmp_path / strategy
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m",
           "modify", *train_args(tiny_run, out, "--strategy", strategy, "--save-every", "2")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    # torchrun's own report ends stderr; a failing rank's message is earlier (a rank once aborted, SIGABRT,
    # in about one of 25 runs here, and the tail alone did not say why).
    causes = [
        line for line in proc.stderr.splitlines() if any(w in line for w in ("Error", "error:", "terminate", "what()"))
    ]
    assert proc.returncode == 0, "\n".join(causes[:20]) + "\n...\n" + proc.stderr[-2000:]
    model = modify.from_pretrained(out)
    assert [b.index for b in modify.find_blocks(model) if b.routed] == [1, 3]
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "router" in n)
    rows = read_metrics(out / "metrics.csv")
    assert len(rows) == 4 and rows[0]["tokens"] == 2 * 2 * 16  # two processes, each its own batch of 2
    state = json.loads((out / "checkpoints" / "step-000002" / "trainer" / "state.json").read_text())
    assert state["world_size"] == 2
    before, after = _weights(tiny_run["converted"]), _weights(out)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "model.layers.3.mod_router.weight" in changed and "model.layers.2.self_attn.q_proj.weight" in changed
    with torch.no_grad():
        logits = model(torch.randint(0, 97, (1, 12))).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("mode", ["routers", "routers+norms"])
def test_partial_modes_change_only_what_they_train(tiny_run: dict[str, Path], tmp_path: Path, mode: str) -> None:
    assert main(train_args(tiny_run, tmp_path / "run", "--train", mode, "--router-lr", "1e-2", "--lr", "1e-2")) == 0
    before, after = _weights(tiny_run["converted"]), _weights(tmp_path / "run")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    routers = {k for k in before if "mod_router" in k and not k.endswith("scale")}
    norms = {k for k in before if "norm" in k}
    assert routers <= changed
    assert changed <= (
        routers | {k for k in before if "mod_router" in k} | (norms if mode == "routers+norms" else set())
    )
    if mode == "routers+norms":
        assert norms <= changed


def test_lora_merges_into_the_saved_model_and_keeps_adapters(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel

    out = tmp_path / "lora"
    assert main(train_args(tiny_run, out, "--train", "lora", "--lr", "1e-2", "--lora-rank", "4")) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = _weights(out)
    # peft's own merge of the saved adapters into the converted model gives the same weights
    reference = PeftModel.from_pretrained(modify.from_pretrained(tiny_run["converted"]), out / "adapter")
    reference = reference.merge_and_unload()
    trained_routers = {k: v for k, v in merged.items() if "mod_router" in k}
    reference.load_state_dict(trained_routers, strict=False)  # routers train in full, outside the adapters
    expected = reference.state_dict()
    for key, value in merged.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-6, msg=key)
    base = _weights(tiny_run["converted"])
    assert not torch.equal(
        base["model.layers.0.self_attn.q_proj.weight"], merged["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(base["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])


def test_capacity_one_trains_like_the_dense_model(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    """Every block routed at capacity 1.0, routers held still, no clipping: the dense model's losses, step by step.

    The first step's loss is bit-identical (the forward performs the dense float operations). Backward sums the
    stream's gradient in another order (g_out + (g_attn + g_mlp) where the dense block does (g_out + g_mlp) +
    g_attn), so later steps agree to float32 rounding, not bit for bit.
    """
    frozen = ("--router-lr", "0", "--lr", "1e-2", "--clip", "0", "--steps", "6")
    assert main(train_args(tiny_run, tmp_path / "dense", "--dense", *frozen, model="src")) == 0
    assert main(train_args(tiny_run, tmp_path / "routed", *frozen, model="full")) == 0
    dense, routed = read_metrics(tmp_path / "dense" / "metrics.csv"), read_metrics(tmp_path / "routed" / "metrics.csv")
    assert routed[0]["loss"] == dense[0]["loss"]
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in routed], dtype=torch.float64),
        torch.tensor([r["loss"] for r in dense], dtype=torch.float64),
        rtol=1e-6,
        atol=0.0,
    )
    assert dense[-1]["loss"] < dense[0]["loss"] - 0.3  # and it does learn


def test_capacity_anneals_from_one_to_the_plan(tiny_run: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    from modify.api import routed_blocks
    from modify.train import loop

    seen: list[list[float]] = []
    step = loop.Trainer.train_step

    def record(self: loop.Trainer, batches):  # type: ignore[no-untyped-def]
        row = step(self, batches)
        seen.append([state.capacity for _, state in routed_blocks(self.inner)])
        return row

    monkeypatch.setattr(loop.Trainer, "train_step", record)
    assert main(train_args(tiny_run, tmp_path / "run", "--steps", "6", "--capacity-anneal", "4")) == 0
    assert [c[0] for c in seen] == pytest.approx([0.875, 0.75, 0.625, 0.5, 0.5, 0.5])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["mixture_of_depths"]["capacities"] == [0.5, 0.5]


def test_non_finite_steps_are_skipped_and_a_streak_stops_the_run(
    tiny_run: dict[str, Path], tmp_path: Path, monkeypatch, capsys
) -> None:
    from modify.train import loop

    bad_steps: set[int] = {2}
    forward = loop.Trainer._forward

    def poisoned(self: loop.Trainer, batch: torch.Tensor):  # type: ignore[no-untyped-def]
        loss, parts = forward(self, batch)
        if self.step + 1 not in bad_steps:
            return loss, parts
        return loss * float("nan"), {k: v * float("nan") for k, v in parts.items()}

    monkeypatch.setattr(loop.Trainer, "_forward", poisoned)
    weights: list[dict[str, torch.Tensor]] = []
    step = loop.Trainer.train_step

    def snapshot(self: loop.Trainer, batches):  # type: ignore[no-untyped-def]
        row = step(self, batches)
        # Parameters: the running thresholds (router buffers) follow every forward, a skipped step's too.
        weights.append({k: v.detach().clone() for k, v in self.inner.named_parameters()})
        return row

    monkeypatch.setattr(loop.Trainer, "train_step", snapshot)
    assert main(train_args(tiny_run, tmp_path / "one")) == 0
    assert "step 2: non-finite loss; step skipped" in capsys.readouterr().err
    rows = read_metrics(tmp_path / "one" / "metrics.csv")
    assert [r["skipped"] for r in rows] == [0, 1, 0, 0]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # the bad step moved nothing
    assert not all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])
    bad_steps.update({3, 4, 5})
    code = main(train_args(tiny_run, tmp_path / "streak", "--steps", "8", "--max-bad-steps", "3"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("modify train: error: 3 steps in a row had a non-finite loss")
    assert "Traceback" not in "\n".join(err)


def test_routers_and_skip_paths_train_alone(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    converted = tmp_path / "skip"
    flags = ["--capacity", "0.5", "--skip-path", "linear", "--skip-rank", "4", "-q"]
    assert main(["convert", str(tiny_run["src"]), str(converted), *flags]) == 0
    inputs = {**tiny_run, "skip": converted}
    argv = train_args(inputs, tmp_path / "run", "--train", "routers+skip", "--lr", "1e-2", model="skip")
    assert main(argv) == 0
    before, after = _weights(converted), _weights(tmp_path / "run")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    paths = {k for k in before if "mod_skip_path" in k}
    assert paths and {k for k in paths if k.endswith("up.weight")} <= changed  # the zero output layer moved
    assert changed <= paths | {k for k in before if "mod_router" in k}
    loaded = modify.from_pretrained(tmp_path / "run")
    assert loaded.config.mixture_of_depths["skip_paths"] == ["linear-4", "linear-4"]
