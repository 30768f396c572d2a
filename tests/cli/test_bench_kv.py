"""``modify bench --kv``: plans run with skipped tokens' keys and values kept (issue 28), beside the paper's, and
their FLOPs counted as they run; bad kv input fails in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modify.bench.models import BenchPlan, parse_plan, with_kv
from modify.cli import main
from modify.errors import UsageError


def bench(*argv: str, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["bench", *argv, "--repeats", "1", "--json", "-q"]) == 0
    return json.loads(capsys.readouterr().out)


def test_each_plan_runs_once_per_kv_option(saved_models: dict[str, Path], capsys) -> None:
    out = bench(str(saved_models["llama"]), "--seq-len", "32", "--batch-size", "2", "--plans", "all@0.25",
                "--kv", "all", "routed", "--implementations", "dense", "converted", capsys=capsys)  # fmt: skip
    assert out["plans"] == {"all@0.25+kv=all": "4 blocks at 0.25, kv=all", "all@0.25": "4 blocks at 0.25"}
    ratios = {s["plan"]: s["flop_ratio"] for s in out["summary"]}
    # Every token's keys and values cost FLOPs: a smaller ratio than the paper's block, still above 1.
    assert 1.0 < ratios["all@0.25+kv=all"] < ratios["all@0.25"]
    for entry in out["summary"]:
        assert entry["forward_speedup"] > 0 and entry["train_speedup"] > 0
        assert 0.0 < entry["forward_routing_share"] < 1.0 and 0.0 < entry["train_routing_share"] < 1.0
    forward = next(r for r in out["records"] if r["mode"] == "forward")
    rows = {row["name"]: row for row in forward["results"]}
    for name in ("dense", "converted@all@0.25+kv=all", "converted@all@0.25"):
        # the analytic count is what the counter saw in the warm-up forward
        assert rows[name]["flops_measured"] == rows[name]["flops_analytic"]
    assert rows["converted@all@0.25"]["flops_measured"] < rows["converted@all@0.25+kv=all"]["flops_measured"]


def test_saved_kv_all_model_benchmarks_its_own_kv(saved_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "mod"
    assert main(["convert", str(saved_models["llama"]), str(out_dir), "--capacity", "0.5", "--kv", "all", "-q"]) == 0
    capsys.readouterr()
    out = bench(str(out_dir), "--seq-len", "16", "--batch-size", "2", "--measure", "forward", capsys=capsys)
    assert out["plans"] == {"saved+kv=all": "2 blocks at 0.5, kv=all"}
    # --kv routed runs the same saved blocks as the paper's
    out = bench(str(out_dir), "--seq-len", "16", "--batch-size", "2", "--measure", "forward", "--kv", "routed",
                capsys=capsys)  # fmt: skip
    assert out["plans"] == {"saved": "2 blocks at 0.5"}


def test_with_kv_labels_and_checks() -> None:
    plan = parse_plan("all@0.125", 4)
    assert plan.kv_of(0) == "routed" and plan.label == "all@0.125"
    both = with_kv(plan, "all")
    assert both.label == "all@0.125+kv=all" and {both.kv_of(i) for i in range(4)} == {"all"}
    assert with_kv(both, "routed").label == "all@0.125"
    assert BenchPlan("x", {0: 0.5, 1: 0.5}, {1: "all"}).describe() == "2 blocks at 0.5, kv=all on 1"
    with pytest.raises(UsageError, match="unknown kv option 'foo'"):
        with_kv(plan, "foo")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kv", "foo"], "argument --kv: invalid choice: 'foo' (choose from 'routed', 'all')"),
        (["--kv", "ALL"], "argument --kv: invalid choice: 'ALL' (choose from 'routed', 'all')"),
        (["--kv"], "argument --kv: expected at least one argument"),
    ],
)
def test_bad_kv_fails_in_one_line(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:  # argparse's own usage errors, before any model is built
        main(["bench", "smollm2-135m", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "--help" in err and len(err.strip().splitlines()) == 1
