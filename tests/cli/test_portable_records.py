"""What convert, calibrate and train write holds no local path: sources and data by name, size and SHA-256;
``modify verify`` finds the source by ``--source``, the recorded model id or an old record's path, checked."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest

from modify.cli import main
from modify.testing import tiny_model, tiny_tokenizer

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it", "was", "red", "blue"]
CALIBRATION = ["--tokens", "512", "--seq-len", "32", "--sensitivity-tokens", "64", "--flops-budget", "0.75"]
CALIBRATION += ["--calibration-dtype", "float32"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _source(directory: Path, seed: int = 0) -> Path:
    """A tiny llama with a character tokenizer (an eos, for training) saved as a model directory."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "<eos>"})
    tiny_model("llama", seed=seed, vocab_size=98).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _source(tmp_path_factory.mktemp("portable-src") / "my-llama")


def _text(directory: Path) -> Path:
    rng = random.Random(0)
    directory.mkdir(parents=True)
    for i in range(4):
        doc = " ".join(rng.choice(WORDS) for _ in range(300))
        (directory / f"doc{i}.txt").write_text(doc + ".\n")
    return directory


def test_nothing_written_holds_a_local_path(src: Path, tmp_path: Path, capsys) -> None:
    data = _text(tmp_path / "data")
    plan, out, run = tmp_path / "plans" / "PLAN.json", tmp_path / "out", tmp_path / "run"
    files = sorted(data.iterdir())
    calibrate = ["calibrate", str(src), "--data", *map(str, files), "--out", str(plan), *CALIBRATION, "-q"]
    assert main(calibrate) == 0
    assert main(["convert", str(src), str(out), "--plan", str(plan), "-q"]) == 0
    train = ["train", str(out), "--data", str(data), "--out", str(run), "--steps", "3", "--save-every", "2"]
    train += ["--seq-len", "16", "--batch-size", "2", "--eval-fraction", "0.25", "--eval-tokens", "32"]
    assert main([*train, "--dtype", "float32", "-q"]) == 0

    forbidden = {str(p) for p in (tmp_path, tmp_path.resolve(), src, src.resolve(), Path.home())}
    written = [p for root in (plan.parent, out, run) for p in root.rglob("*") if p.is_file()]
    # train_config.yaml writes its paths relative to its own directory, so the run reruns from anywhere.
    scanned = [p for p in written if p.suffix in (".json", ".csv", ".md", ".txt", ".yaml", ".log")]
    assert {"PLAN.json", "config.json", "README.md", "metrics.csv", "state.json", "train_config.yaml"} <= {
        p.name for p in scanned
    }
    for path in scanned:
        text = path.read_text(errors="replace")
        leaked = [f for f in forbidden if f in text]
        assert not leaked, f"{path.relative_to(tmp_path)} holds {leaked}"

    weights = src / "model.safetensors"
    expected = {"name": weights.name, "size": weights.stat().st_size, "sha256": _sha256(weights)}
    for config in (out / "config.json", run / "config.json"):
        record = json.loads(config.read_text())["mixture_of_depths"]
        assert record["source"]["kind"] == "directory" and record["source"]["name"] == "my-llama"
        assert expected in record["source"]["files"]
        assert record["calibration"]["data"]["files"] == [
            {"name": f.name, "size": f.stat().st_size, "sha256": _sha256(f)} for f in files
        ]
    saved = json.loads(plan.read_text())
    assert expected in saved["source"]["files"] and "path" not in saved["source"]
    assert "`my-llama` (directory)" in (out / "README.md").read_text()


def test_verify_finds_the_source_and_refuses_another(src: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--source", str(src), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]

    # A directory source has no model id: without --source there is nothing to find it by.
    assert main(["verify", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot find the source" in err[0] and "--source" in err[0], err

    other = _source(tmp_path / "other", seed=1)  # same shapes and file sizes, other weights
    assert main(["verify", str(out), "--source", str(other)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the source OUT was converted from" in err[0] and "SHA-256" in err[0], err


def test_verify_finds_a_cached_model_id(src: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    revision = "0" * 40
    shutil.copytree(src, cache / "models--tiny--llama" / "snapshots" / revision)
    (cache / "models--tiny--llama" / "refs").mkdir()
    (cache / "models--tiny--llama" / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "out"
    assert main(["convert", "tiny/llama", str(out), "-q"]) == 0
    record = json.loads((out / "config.json").read_text())["mixture_of_depths"]["source"]
    assert record["kind"] == "hub-cache" and record["model_id"] == "tiny/llama" and str(cache) not in str(record)
    capsys.readouterr()
    assert main(["verify", str(out), "--json"]) == 0  # found in the hub cache by its id
    assert json.loads(capsys.readouterr().out)["ok"]


def test_an_old_record_with_a_path_still_verifies_and_is_not_written_again(src: Path, tmp_path: Path, capsys) -> None:
    import modify
    from modify.io.checkpoint import write_converted

    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "-q"]) == 0
    config = json.loads((out / "config.json").read_text())
    config["mixture_of_depths"]["source"] = {"kind": "directory", "path": str(src), "model_id": ""}
    config["mixture_of_depths"]["calibration"] = {"data": {"files": [str(tmp_path / "plays.txt")]}}
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["verify", str(out), "--json"]) == 0  # the path older versions recorded
    assert json.loads(capsys.readouterr().out)["ok"]

    again = tmp_path / "again"
    again.mkdir()
    write_converted(modify.from_pretrained(out), None, again)  # as training re-saves a converted model
    plan = json.loads((again / "config.json").read_text())["mixture_of_depths"]
    assert plan["source"] == {"kind": "directory", "model_id": ""}
    assert plan["calibration"]["data"]["files"] == [{"name": "plays.txt"}]
    assert str(tmp_path) not in (again / "config.json").read_text() + (again / "README.md").read_text()
