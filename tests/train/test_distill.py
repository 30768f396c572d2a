"""Distillation from the original model (``modify train --distill``, :mod:`modify.train.distill`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import modify
from modify.cli import main
from modify.train.distill import DistillationTrainer, Teacher, distill_loss, hidden_loss, kl_per_token
from modify.train.report import read_metrics
from modify.train.trainable import prepare_trainable
from tests.helpers import open_gates
from tests.train.conftest import train_args
from tests.train.test_train_cli import _weights, killed_run


def _reference(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, w: float, tau: float):
    """The loss in float64, unchunked, with autograd: (1 − W)·CE + W·τ²·KL over the predicted tokens."""
    s = student[:, :-1].double().reshape(-1, student.shape[-1])
    t = teacher[:, :-1].double().reshape(-1, student.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != -100
    ce = torch.nn.functional.cross_entropy(s[keep], y[keep])
    log_s, log_t = torch.log_softmax(s / tau, -1), torch.log_softmax(t / tau, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)[keep].mean()
    return (1 - w) * ce + w * tau**2 * kl, ce, kl


@pytest.mark.parametrize(("w", "tau"), [(1.0, 1.0), (0.5, 2.0), (0.0, 1.0), (0.3, 0.7)])
def test_loss_and_gradient_match_a_float64_reference(w: float, tau: float) -> None:
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(3, 9, 50, generator=g) * 3).requires_grad_(True)
    teacher = torch.randn(3, 9, 50, generator=g) * 3
    labels = torch.randint(0, 50, (3, 9), generator=g)
    labels[1, 4:] = -100  # padding predicts nothing
    parts = distill_loss(student, teacher, labels, w, tau, chunk=5)
    parts.loss.backward()
    ref_student = student.detach().double().requires_grad_(True)
    total, ce, kl = _reference(ref_student, teacher, labels, w, tau)
    total.backward()
    assert abs(parts.loss.item() - total.item()) < 1e-5 * max(1.0, total.item())
    assert abs(parts.lm.item() - ce.item()) < 1e-5 and abs(parts.kd.item() - kl.item()) < 1e-5
    assert torch.allclose(student.grad.double(), ref_student.grad, atol=1e-6, rtol=1e-5)
    assert student.grad[:, -1].abs().max() == 0  # the last position predicts nothing


def test_chunked_equals_unchunked_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 33, 97, generator=g) * 4
    teacher = torch.randn(2, 33, 97, generator=g) * 4
    labels = torch.randint(0, 97, (2, 33), generator=g)
    results = []
    for chunk in (7, 64, 10_000):
        student = logits.clone().requires_grad_(True)
        parts = distill_loss(student, teacher, labels, 0.6, 1.5, chunk=chunk)
        parts.loss.backward()
        results.append((parts.loss.detach(), parts.kd, student.grad))
    for loss, kd, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(kd, results[0][1]) and torch.equal(grad, results[0][2])
    rows = kl_per_token(logits.reshape(-1, 97), teacher.reshape(-1, 97), chunk=5)
    assert torch.equal(rows, kl_per_token(logits.reshape(-1, 97), teacher.reshape(-1, 97), chunk=1000))


def test_bfloat16_logits_get_no_float32_copy_and_a_bfloat16_gradient() -> None:
    student = torch.randn(2, 8, 40).to(torch.bfloat16).requires_grad_(True)
    teacher = torch.randn(2, 8, 40).to(torch.bfloat16)
    parts = distill_loss(student, teacher, torch.randint(0, 40, (2, 8)), 1.0, 1.0, chunk=4)
    assert parts.loss.dtype == torch.float32
    parts.loss.backward()
    assert student.grad.dtype == torch.bfloat16 and student.grad.abs().sum() > 0


def test_hidden_loss_is_relative_squared_error() -> None:
    t = torch.randn(2, 5, 8)
    assert hidden_loss([t.clone()], [t]).item() == 0
    assert abs(hidden_loss([2 * t], [t]).item() - 1.0) < 1e-6  # ‖2t − t‖² / ‖t‖²


def test_self_teacher_is_the_original_model_exactly() -> None:
    from modify.testing import tiny_model

    torch.manual_seed(0)
    original = tiny_model("llama")
    ids = torch.randint(3, 90, (2, 12))
    with torch.no_grad():
        expected = original(input_ids=ids, use_cache=False).logits
    student = modify.convert(tiny_model("llama"), capacity=0.25, layers="all")
    norms = [p for n, p in student.named_parameters() if "norm" in n]
    teacher = Teacher(student, restore=norms)
    student.train()
    with torch.no_grad():  # training moved the norms and the routers
        for p in norms:
            p.mul_(1.5)
    routed = student(input_ids=ids, use_cache=False).logits
    got = teacher(student, ids).logits
    assert torch.equal(got, expected) and not torch.allclose(routed, expected)
    assert student.training and torch.equal(norms[0], norms[0].detach().clone())
    assert all(s.enabled for s in (state for _, state in modify.api.routed_blocks(student)))
    assert not torch.equal(norms[0], teacher.start[0])  # the trained value is back after the teacher's forward


def test_capacity_one_distillation_loss_and_gradient_are_zero(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = train_args(tiny_run, out, "--distill", "--train", "full", model="full")
    assert main([*argv[:6], "--steps", "2", *argv[8:], "--lr", "1e-2"]) == 0
    rows = read_metrics(out / "metrics.csv")
    assert [r["kd_loss"] for r in rows] == [0.0, 0.0]
    assert [r["grad_norm"] for r in rows] == [0.0, 0.0]
    assert rows[-1]["eval_kl"] == 0.0
    before, after = _weights(tiny_run["full"]), _weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before if "router" not in k)


@pytest.mark.parametrize("mode", ["full", "routers+norms", "lora"])
def test_distillation_trains_and_logs_its_parts(tiny_run: dict[str, Path], tmp_path: Path, mode: str) -> None:
    out = tmp_path / "run"
    extra = ["--distill", "--distill-weight", "0.5", "--distill-temperature", "2", "--distill-hidden", "0.1"]
    assert main(train_args(tiny_run, out, *extra, "--train", mode, "--lr", "1e-2", "--eval-every", "2")) == 0
    rows = read_metrics(out / "metrics.csv")
    assert all(r["kd_loss"] > 0 and r["hidden_loss"] > 0 and r["loss"] > 0 for r in rows)
    assert [r["step"] for r in rows if r["eval_kl"] == r["eval_kl"]] == [2, 4]
    assert rows[-1]["eval_kl"] > 0


def test_distillation_pulls_the_routed_model_towards_the_original(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    """Held-out KL to the original falls faster under distillation than under the LM loss at equal steps."""
    kl = {}
    for name, extra in {"kd": ["--distill"], "lm": []}.items():
        out = tmp_path / name
        argv = train_args(tiny_run, out, *extra, "--train", "full", "--lr", "3e-3")
        assert main([*argv[:6], "--steps", "12", *argv[8:]]) == 0
        model = modify.from_pretrained(out).eval()
        original = modify.from_pretrained(tiny_run["converted"])
        ids = torch.randint(3, 90, (4, 16), generator=torch.Generator().manual_seed(5))
        with torch.no_grad(), modify.routing_disabled(original):
            ref = original(input_ids=ids).logits
            got = model(input_ids=ids).logits
        kl[name] = kl_per_token(got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1])).mean().item()
    assert kl["kd"] < kl["lm"], kl


def test_resume_after_kill_with_distillation_continues_exactly(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    args = ["--steps", "5", "--save-every", "2", "--train", "routers+norms", "--distill", "--distill-weight", "0.7"]
    assert main(train_args(tiny_run, tmp_path / "straight", *args)) == 0
    killed = killed_run(tiny_run, tmp_path, args, kill_at=3)
    assert main(train_args(tiny_run, killed, *args, "--resume")) == 0
    straight, resumed = read_metrics(tmp_path / "straight" / "metrics.csv"), read_metrics(killed / "metrics.csv")
    for key in ("loss", "kd_loss", "grad_norm"):
        assert [r[key] for r in resumed] == [r[key] for r in straight], key
    a, b = _weights(tmp_path / "straight"), _weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_torchrun_two_processes_distil(tiny_run: dict[str, Path], tmp_path: Path, strategy: str) -> None:
    out = tmp_path / strategy
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = train_args(tiny_run, out, "--strategy", strategy, "--distill", "--distill-hidden", "0.1", "--train", "full")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "modify",
           *argv]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out / "metrics.csv")
    assert len(rows) == 4 and all(r["kd_loss"] > 0 and r["hidden_loss"] > 0 for r in rows)
    assert rows[-1]["eval_kl"] > 0
    assert "frozen copy" in (out / "train.log").read_text()


def test_a_teacher_with_another_vocabulary_is_refused(
    tiny_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from modify.testing import tiny_model, tiny_tokenizer

    other = tmp_path / "other"
    tiny_model("llama", vocab_size=120).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    out = tmp_path / "run"
    assert main(train_args(tiny_run, out, "--distill", "--teacher", str(other))) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another vocabulary" in err[0] and "--teacher" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dense", "--distill"], "--distill with --dense needs --teacher SRC"),
        (["--distill-weight", "0.5"], "--distill-weight needs --distill"),
        (["--distill", "--distill-weight", "1.5"], "--distill-weight must be in [0, 1]"),
        (["--distill", "--distill-temperature", "0"], "--distill-temperature must be positive"),
        (["--teacher", "x"], "--teacher needs --distill"),
    ],
)
def test_bad_distillation_settings_get_one_line(
    tiny_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    model = "src" if "--dense" in extra else "converted"
    assert main(train_args(tiny_run, tmp_path / "run", *extra, model=model)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_hf_trainer_helper_adds_the_same_loss(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    from transformers import TrainingArguments

    # the routers train: the model with routing off stays the original (base weights that train need a teacher)
    model = prepare_trainable(modify.from_pretrained(tiny_run["converted"]), "routers")
    ids = torch.randint(3, 90, (4, 16), generator=torch.Generator().manual_seed(2))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=1,
                             learning_rate=0.0, report_to=[], use_cpu=True, save_strategy="no")  # fmt: skip
    trainer = DistillationTrainer(model=model, args=args, train_dataset=data, distill_weight=0.5)
    batch = {"input_ids": ids, "labels": ids}
    loss = trainer.compute_loss(model, batch)
    with torch.no_grad(), modify.routing_disabled(model):
        teacher = model(input_ids=ids).logits
    expected = distill_loss(model(input_ids=ids).logits, teacher, ids, 0.5)
    assert torch.allclose(loss, expected.loss) and expected.kd > 0
    trainer.train()


def test_router_phase_gives_skipped_tokens_router_gradient() -> None:
    """Top-k sends a skipped token's score no gradient; the relaxed router phase does, with the same forward
    selection (its mask is the top-k rule's)."""
    from modify.api import routed_blocks
    from modify.testing import tiny_model

    torch.manual_seed(0)
    model = modify.convert(tiny_model("llama"), capacity=0.25, layers=[1])
    open_gates(model)
    block, state = routed_blocks(model)[0]
    ids = torch.randint(3, 90, (2, 16))
    grads = {}
    for relaxed in (False, True):
        state.relaxed = relaxed
        model.train()
        scores: dict[str, torch.Tensor] = {}
        seen: list[torch.Tensor] = []
        handle = block.mod_router.register_forward_hook(lambda m, a, out, d=scores: d.__setitem__("s", out))
        state.observer = lambda s, idx, g, out=seen: out.append(idx)
        out = model(input_ids=ids, labels=ids)
        scores["s"].retain_grad()
        out.loss.backward()
        handle.remove()
        grad = scores["s"].grad
        skipped = torch.ones_like(grad, dtype=torch.bool).scatter_(1, seen[-1], False)
        grads[relaxed] = grad[skipped].abs().sum().item()
        assert grad[~skipped].abs().sum() > 0  # the gate's gradient reaches the routed tokens either way
        model.zero_grad()
    assert grads[False] == 0 and grads[True] > 0
    state.relaxed = True
    model.eval()
    with torch.no_grad():
        relaxed_eval = model(input_ids=ids).logits
        state.relaxed = False
        assert torch.equal(relaxed_eval, model(input_ids=ids).logits)  # eval never relaxes


def test_router_phase_runs_in_modify_train(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(train_args(tiny_run, out, "--router-phase", "2", "--train", "routers", "--lr", "0")) == 0
    before, after = _weights(tiny_run["converted"]), _weights(out)
    assert not torch.equal(before["model.layers.1.mod_router.weight"], after["model.layers.1.mod_router.weight"])
