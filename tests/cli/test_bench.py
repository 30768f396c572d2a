"""``modify bench``: every implementation timed per setting and mode, the summary keys, CSV/PNG outputs, the
memory guard, a converted model's own plan, and one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from modify.cli import main


def bench(*argv: str, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["bench", *argv, "--repeats", "2", "--json", "-q"]) == 0
    return json.loads(capsys.readouterr().out)


def test_dense_source_converted_on_the_fly(saved_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    files = ["--csv", str(tmp_path / "b.csv"), "--plot", str(tmp_path / "b.png"), "--markdown", str(tmp_path / "b.md")]
    out = bench(str(saved_models["llama"]), "--seq-len", "16", "32", "--batch-size", "2", "--plans", "paper",
                "all@0.25", *files, capsys=capsys)  # fmt: skip
    assert [(s["plan"], s["seq_len"]) for s in out["summary"]] == [
        ("paper", 16), ("all@0.25", 16), ("paper", 32), ("all@0.25", 32)
    ]  # fmt: skip
    for entry in out["summary"]:
        assert entry["forward_speedup"] > 0 and entry["train_speedup"] > 0
        assert entry["flop_ratio"] > 1.0
        assert 0.0 < entry["forward_routing_share"] < 1.0 and 0.0 < entry["train_routing_share"] < 1.0
        assert {"forward_masked_speedup", "forward_per_sample_speedup", "train_masked_speedup"} <= set(entry)
    # fewer tokens through routed blocks: a larger FLOP ratio at the lower capacity, and measured FLOPs agree
    by_plan = {s["plan"]: s["flop_ratio"] for s in out["summary"] if s["seq_len"] == 32}
    assert by_plan["all@0.25"] > by_plan["paper"]
    record = next(r for r in out["records"] if r["mode"] == "forward" and r["seq_len"] == 32)
    measured = {row["name"]: row["flops_measured"] for row in record["results"]}
    assert measured["converted@all@0.25"] < measured["converted@paper"] < measured["dense"]
    assert measured["masked@all@0.25"] >= measured["dense"]  # every token through every block, and the routers
    assert len(record["results"][0]["times"]) == 2
    rows = list(csv.DictReader((tmp_path / "b.csv").open()))
    assert len(rows) == 2 * 2 * (1 + 2 * 3)  # T x mode x (dense + plans x implementations)
    assert {"device", "dtype", "torch", "transformers", "triton", "commit"} <= set(rows[0])
    assert rows[0]["device"].startswith("cpu") and rows[0]["dtype"] == "float32"
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "b.md").read_text()
    assert "**forward**" in table and "**train**" in table and "| all@0.25 | 2 | 32 |" in table


def test_memory_guard_skips_larger_settings(saved_models: dict[str, Path], capsys) -> None:
    out = bench(str(saved_models["llama"]), "--seq-len", "8", "64", "--batch-size", "1", "--plans", "paper",
                "--measure", "forward", "--memory-budget", "0.000001", "--implementations", "dense", "converted",
                capsys=capsys)  # fmt: skip
    assert [r["seq_len"] for r in out["records"] if "results" in r] == [8]  # nothing to project from yet
    assert out["skipped"][0]["seq_len"] == 64 and "exceeds" in out["skipped"][0]["skipped"]


def test_converted_model_benchmarks_its_own_plan(saved_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "mod"
    assert main(["convert", str(saved_models["gpt2"]), str(out_dir), "--capacity", "0.5", "-q"]) == 0
    out = bench(str(out_dir), "--seq-len", "16", "--batch-size", "2", "--measure", "forward", capsys=capsys)
    assert [s["plan"] for s in out["summary"]] == ["saved"]
    assert out["plans"]["saved"] == "2 blocks at 0.5"


def test_table_on_stdout(saved_models: dict[str, Path], capsys) -> None:
    assert main(["bench", str(saved_models["llama"]), "--seq-len", "16", "--batch-size", "1", "--repeats", "1",
                 "--measure", "forward", "--plans", "all@0.5", "-q"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "converted@all@0.5" in out and "per-sample@all@0.5" in out and "float32" in out


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["smollm2-135m", "--seq-len", "0"], 2, "--seq-len 0 must be at least 1"),
        (["smollm2-135m", "--plans", "half"], 2, "unknown plan 'half'"),
        (["smollm2-135m", "--plans", "all@1.5"], 2, "out of (0, 1]"),
        (["smollm2-135m", "--plans", "0,99@0.5"], 2, "out of range"),
        (["smollm2-135m", "--plans", "saved"], 2, "plan 'saved' needs a converted MODEL"),
        (["smollm2-135m", "--plans", "missing.json"], 2, "does not exist"),
        (["smollm2-135m", "--implementations", "converted"], 2, "must include dense"),
        (["llama-13b", "--depth", "2"], 2, "--depth applies to named shapes"),
    ],
)
def test_bad_inputs_fail_in_one_line(argv: list[str], code: int, message: str, capsys) -> None:
    assert main(["bench", *argv]) == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
