"""``modify eval --tasks``, ``modify-lm-eval``, the offline tasks: lm-eval scores the routed model, not the dense one.

The tiny models read text one character per token, 128 positions: lm-eval cuts longer requests from the left,
which is the same for every model compared here.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from modify.cli import main
from modify.testing import tiny_model, tiny_tokenizer

pytest.importorskip("lm_eval", reason="lm-eval is the extra modify[eval]")

from modify.bench.harness import TASKS_DIR  # noqa: E402

#: A continuous score (bits per byte of whole passages) and a multiple-choice one, a few documents each.
TASKS = "modify_shakespeare_bpb,modify_pydoc_ending"
LIMIT = "2"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama with its tokenizer, converted at capacity 0.5 and at 1.0 (every other block)."""
    root = tmp_path_factory.mktemp("eval-tasks")
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = "<unk>"
    paths = {name: root / name for name in ("dense", "half", "full")}
    tiny_model("llama").save_pretrained(paths["dense"])
    tokenizer.save_pretrained(paths["dense"])
    for name, capacity in (("half", "0.5"), ("full", "1.0")):
        assert main(["convert", str(paths["dense"]), str(paths[name]), "--capacity", capacity, "-q"]) == 0
    return paths


def _report(model: Path, *extra: str) -> dict:
    out = io.StringIO()
    with redirect_stdout(out):  # capsys is per test; these scores serve several
        assert main(["eval", str(model), "--tasks", TASKS, "--limit", LIMIT, "--json", *extra]) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def reports(models: dict[str, Path]) -> dict[str, dict]:
    return {name: _report(path) for name, path in models.items()}


def _by_metric(report: dict, key: str = "score") -> dict[tuple[str, str], float]:
    return {(r["task"], r["metric"]): r[key] for r in report["scores"]}


def test_tasks_score_the_routed_model(reports: dict[str, dict]) -> None:
    """Capacity 0.5 moves every continuous score off the dense model's; capacity 1.0 gives the dense scores."""
    dense, half, full = (_by_metric(reports[name]) for name in ("dense", "half", "full"))
    assert reports["dense"]["routing"] == "dense" and "no routed blocks" in reports["dense"]["routing_note"]
    assert reports["half"]["routing"] == "topk"
    assert "top-k over each request's whole context" in reports["half"]["routing_note"]
    assert set(dense) == set(half) == set(full)
    assert {task for task, _ in dense} == set(TASKS.split(","))
    for metric in ("bits_per_byte", "byte_perplexity"):
        key = ("modify_shakespeare_bpb", metric)
        assert abs(half[key] - dense[key]) > 1e-4 * dense[key], metric
    assert half[("modify_pydoc_ending", "brier_score")] != dense[("modify_pydoc_ending", "brier_score")]
    assert full == pytest.approx(dense, rel=1e-9)


def test_baseline_column_and_routing_line(models: dict[str, Path], reports: dict[str, dict], tmp_path, capsys) -> None:
    """--baseline scores the source on the same tasks: its column is the dense run's scores, the ratio theirs;
    the table's first line states the routing."""
    saved = tmp_path / "scores.json"
    argv = ["eval", str(models["half"]), "--tasks", TASKS, "--limit", LIMIT, "--routing", "causal",
            "--baseline", str(models["dense"]), "--output", str(saved)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads(saved.read_text())
    assert report["routing"] == "causal"
    assert out.splitlines()[0] == f"{models['half']}: {report['routing_note']}"
    assert "routed causally" in report["routing_note"]
    assert f"over {models['dense']}" in out.splitlines()[3] and "bits_per_byte ↓" in out
    assert _by_metric(report, "baseline") == _by_metric(reports["dense"])
    for row in report["scores"]:
        if row["baseline"]:
            assert row["over_baseline"] == pytest.approx(row["score"] / row["baseline"])
    assert report["lm_eval_results"]["results"].keys() == set(TASKS.split(","))


def test_modify_lm_eval_scores_the_routed_model(models: dict[str, Path], reports: dict, tmp_path, capsys) -> None:
    """lm-eval's own command line through modify-lm-eval: ``--model modify`` and ``--model hf`` score the
    routed model exactly as ``modify eval --tasks`` does."""
    from modify.cli.harness import main as lm_eval_main

    ours = _by_metric(reports["half"])
    for kind in ("modify", "hf"):
        out = tmp_path / kind
        argv = ["--model", kind, "--model_args", f"pretrained={models['half']}", "--tasks", TASKS,
                "--limit", LIMIT, "--device", "cpu", "--output_path", str(out)]  # fmt: skip
        assert lm_eval_main(argv) == 0
        (written,) = out.rglob("results_*.json")
        results = json.loads(written.read_text())["results"]
        theirs = {(t, k.partition(",")[0]): v for t, r in results.items() for k, v in r.items() if k.endswith(",none")}
        assert {k: theirs[k] for k in ours} == pytest.approx(ours, rel=1e-9), kind
    capsys.readouterr()


def test_plain_lm_eval_refuses_a_converted_model(models: dict[str, Path]) -> None:
    """Without modify imported, lm-eval 0.4's hf model stops on OUT's loading marker instead of scoring the
    dense model; docs/eval.md quotes this message and names modify-lm-eval."""
    argv = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={models['half']}",
            "--tasks", "modify_pydoc_ending", "--include_path", str(TASKS_DIR), "--limit", "1",
            "--device", "cpu"]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Unknown quantization type, got modify" in result.stderr
    assert "modify_pydoc_ending" not in result.stdout  # no table: nothing was scored


def _error(capsys: pytest.CaptureFixture, argv: list[str], code: int) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_unknown_task(models: dict[str, Path], capsys) -> None:
    err = _error(capsys, ["eval", str(models["half"]), "--tasks", "modify_offline,hellaswg"], 2)
    assert "unknown task 'hellaswg'" in err and "did you mean hellaswag" in err and "--include-path" in err


def test_lm_eval_not_installed(models: dict[str, Path], monkeypatch, capsys) -> None:
    import modify.bench
    from modify.cli.harness import main as lm_eval_main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an import finds when the package is absent
    monkeypatch.delitem(sys.modules, "modify.bench.harness")
    monkeypatch.delattr(modify.bench, "harness")  # else ``from modify.bench import harness`` finds the attribute
    err = _error(capsys, ["eval", str(models["half"]), "--tasks", "modify_offline"], 1)
    assert "lm-evaluation-harness is not installed" in err and 'pip install "modify[eval]"' in err
    assert lm_eval_main(["--model", "modify", "--tasks", "modify_offline"]) == 1
    assert 'pip install "modify[eval]"' in capsys.readouterr().err


def test_baseline_with_another_tokenizer(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    tiny_model("llama").save_pretrained(other)
    tiny_tokenizer(vocab_size=60).save_pretrained(other)
    err = _error(capsys, ["eval", str(models["half"]), "--tasks", "modify_offline", "--baseline", str(other)], 2)
    assert "another tokenizer" in err and "give the source" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "modify_offline", "--seq-len", "512"], "--seq-len can't be used with --tasks"),
        (["--data", "x.txt", "--limit", "3", "--baseline", "y"], "--limit, --baseline can't be used with --data"),
    ],
)
def test_flags_of_the_other_mode(argv: list[str], message: str, capsys) -> None:
    """Refused by the parser (exit 2, one line), not ignored."""
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "model", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--limit", "2.5"], "--limit 2.5 must be a whole number"),
        (["--include-path", "no/such/dir"], "is not a directory"),
    ],
)
def test_bad_task_values(models: dict[str, Path], argv: list[str], message: str, capsys) -> None:
    err = _error(capsys, ["eval", str(models["half"]), "--tasks", "modify_offline", *argv], 2)
    assert message in err


@pytest.mark.slow
def test_smollm2_beats_chance_on_an_offline_task(capsys) -> None:
    """The real checkpoint on the first 16 documents of the Python-docs task: well above the 0.25 of guessing
    (8 of 16 right by chance has probability 0.03), so the task's choices and labels line up."""
    code = main(["eval", "smollm2", "--tasks", "modify_pydoc_ending", "--limit", "16", "--json", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    scores = _by_metric(json.loads(captured.out))
    assert scores[("modify_pydoc_ending", "acc_norm")] >= 0.5
    assert scores[("modify_pydoc_ending", "brier_score")] < 0.75  # guessing uniformly scores 0.75


def test_offline_tasks_are_what_build_writes(tmp_path: Path) -> None:
    """The shipped JSON lines are the builder's output (the plays' files; Python's docs on the Python that built
    them), and every question has four distinct choices with its answer among them."""
    from modify.bench.tasks.build import write_all

    for path in write_all(tmp_path):
        shipped = TASKS_DIR / path.name
        if path.name != "pydoc_ending.jsonl" or sys.version_info[:2] == (3, 11):
            assert path.read_text("utf-8") == shipped.read_text("utf-8"), path.name
        rows = [json.loads(line) for line in shipped.read_text("utf-8").splitlines()]
        assert {r["split"] for r in rows} <= {"test", "train"} and sum(r["split"] == "test" for r in rows) >= 40
        for r in rows:
            if "choices" in r:
                assert len(set(r["choices"])) == 4 and 0 <= r["label"] < 4
                assert r["choices"][r["label"]] not in r["context"]
