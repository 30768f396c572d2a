"""Calibration on a tiny Llama: determinism, streaming, the budget, identity, router fit, saved plans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import modify
from modify.calibrate.calibration import CalibrationSettings, apply_calibration, calibrate, token_windows
from modify.calibrate.plan_file import load_plan, save_plan
from modify.testing import tiny_model, tiny_tokenizer
from tests.helpers import BlockIO

SETTINGS = CalibrationSettings(
    tokens=4096, seq_len=64, budget=0.6, sensitivity_tokens=512, batch_size=4, refine_rounds=1
)


@pytest.fixture(scope="module")
def calibrated(text: Path):
    model = tiny_model("llama", num_hidden_layers=6)
    windows, data = token_windows(tiny_tokenizer(), [text], SETTINGS.seq_len, SETTINGS.tokens)
    return model, windows, data, calibrate(model, windows, data, SETTINGS)


def test_windows_are_streamed(text: Path) -> None:
    class Counting:
        def __init__(self) -> None:
            self.inner, self.calls = tiny_tokenizer(), 0

        def __call__(self, chunk: str, **kwargs):
            self.calls += 1
            return self.inner(chunk, **kwargs)

    tok = Counting()
    ids, data = token_windows(tok, [text], 64, 640, chunk_chars=100)
    assert ids.shape == (10, 64) and data["tokens"] == 640
    assert tok.calls <= 640 // 100 + 2  # stopped reading once enough tokens were in
    whole = tiny_tokenizer()(text.read_text()[:640], add_special_tokens=False)["input_ids"]
    assert ids.flatten().tolist() == whole


def test_budget_met_and_record_complete(calibrated) -> None:
    _, _, data, cal = calibrated
    assert cal.cost_ratio <= SETTINGS.budget
    assert cal.routed and all(c in SETTINGS.grid for c in cal.capacities)
    assert set(cal.sensitivity) == {str(i) for i in range(6)}
    assert set(cal.sensitivity["0"]) == {"0", "0.125", "0.25", "0.5", "0.75", "1"}
    record = cal.to_dict()
    for key in (
        "settings",
        "data",
        "predicted_loss_increase",
        "measured_loss",
        "dense_loss",
        "router_overlap",
        "rounds",
    ):
        assert key in record
    assert 1 <= len(record["rounds"]) <= 1 + SETTINGS.refine_rounds
    kept = min(record["rounds"], key=lambda r: r["measured"])
    assert kept["capacities"] == cal.capacities
    assert cal.measured_loss - cal.dense_loss == pytest.approx(kept["measured"])
    assert record["data"]["sha256"] == data["sha256"] and record["data"]["tokens"] == 4096
    assert record["settings"]["budget"] == 0.6 and record["settings"]["seq_len"] == 64


def test_calibration_is_deterministic(calibrated) -> None:
    model, windows, data, cal = calibrated
    again = calibrate(model, windows, data, SETTINGS)
    assert again.to_dict() == cal.to_dict()
    assert all(torch.equal(again.routers[i][k], cal.routers[i][k]) for i in cal.routers for k in cal.routers[i])


def test_model_left_dense_and_identity_kept_with_fitted_routers(calibrated) -> None:
    model, windows, _, cal = calibrated
    assert not any("router" in n for n, _ in model.named_parameters())
    ids = windows[:2]
    with torch.no_grad():
        dense = model(ids).logits
        # Fitted (non-zero) routers with the gate scale at 0: capacity 1.0 still reproduces the model.
        modify.convert(model, capacity=1.0, layers=cal.routed)
        for block, state in modify.api.routed_blocks(model):
            for name, p in block.mod_router.named_parameters():
                p.copy_(cal.routers[state.index][name])
        assert torch.equal(model(ids).logits, dense)
        assert any(block.mod_router.weight.abs().sum() > 0 for block, _ in modify.api.routed_blocks(model))
    modify.revert(model)


def test_fitted_routers_find_the_important_tokens(calibrated) -> None:
    """Each fitted router's score correlates with its block's log-importance (a wrong sign or no fit: <= 0)."""
    model, windows, _, cal = calibrated
    apply_calibration(model, cal)
    correlations = []
    for i in cal.routed:
        block = model.model.layers[i]
        io = BlockIO(block)
        with torch.no_grad(), modify.routing_disabled(model):
            model(windows[:16])
        io.remove()
        with torch.no_grad():
            score = block.mod_router(io.x).flatten()
        target = (io.y - io.x).norm(dim=-1).log().flatten()
        correlations.append(float(torch.corrcoef(torch.stack([score, target]))[0, 1]))
    modify.revert(model)
    assert min(correlations) > 0.1 and sum(correlations) / len(correlations) > 0.2, correlations
    assert all(0 <= v <= 1 for v in cal.router_overlap.values())


def test_plan_round_trip(calibrated, tmp_path: Path) -> None:
    model, windows, _, cal = calibrated
    path = save_plan(cal, tmp_path / "plan.json", {"kind": "test"})
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded, source = load_plan(path)
    assert source == {"kind": "test"} and loaded.to_dict() == json.loads(json.dumps(cal.to_dict()))
    ids = windows[:2]
    with torch.no_grad():
        apply_calibration(model, cal)
        expected = model(ids).logits
        plan = model.config.mixture_of_depths
        modify.revert(model)
        apply_calibration(model, loaded)
        assert torch.equal(model(ids).logits, expected)
    assert plan["calibration"]["data"]["sha256"] == cal.data["sha256"] and plan["keep_first"] == 1
    modify.revert(model)


def test_cli_calibrate_then_convert_with_the_plan(text: Path, tmp_path: Path, capsys) -> None:
    from modify.cli import main

    src = tmp_path / "src"
    tiny_model("llama", num_hidden_layers=6).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    flags = ["--tokens", "2048", "--seq-len", "64", "--sensitivity-tokens", "256", "--flops-budget", "0.6"]
    assert (
        main(["calibrate", str(src), "--data", str(text), "--out", str(tmp_path / "plan.json"), *flags, "--json"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["cost_ratio"] <= 0.6 and (tmp_path / "plan.png").is_file()
    assert main(["convert", str(src), str(tmp_path / "a"), "--plan", str(tmp_path / "plan.json"), "-q"]) == 0
    assert main(["convert", str(src), str(tmp_path / "b"), "--calibrate", str(text), *flags, "-q"]) == 0
    a, b = modify.from_pretrained(tmp_path / "a"), modify.from_pretrained(tmp_path / "b")
    ids = torch.randint(3, 97, (2, 64))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)  # same data and seed: the same plan and routers
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "c"), "--calibrate", str(text)]) == 2
    assert "--calibrate needs --flops-budget" in capsys.readouterr().err
    # Below the cheapest routed plan, with removal (which costs nothing) off the grid.
    out = ["--out", str(tmp_path / "p.json")]
    assert main(["calibrate", str(src), "--data", str(text), *out, *flags[:-1], "0.01", "--removal", "never"]) == 2
    assert "below the cheapest plan on this grid" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "p.json").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["calibrate", str(src), "--data", str(text), "--out", str(blocker / "p.json"), *flags]) == 1
    assert "a-file is not a directory" in capsys.readouterr().err and blocker.read_text() == "x"
    nested = tmp_path / "plans" / "today" / "p.json"  # missing directories are created, as for OUT
    assert main(["calibrate", str(src), "--data", str(text), "--out", str(nested), *flags, "-q"]) == 0
    assert nested.is_file() and nested.with_suffix(".safetensors").is_file()
