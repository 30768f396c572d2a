"""``modify convert``: round trips, and a one-line answer to every bad input with nothing written."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import modify
from modify.cli import main
from modify.testing import tiny_model
from tests.cli.conftest import tree_digest


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "phi", "opt"])
def test_round_trip_equals_converting_in_memory(family: str, saved_models: dict, tmp_path: Path, capsys) -> None:
    src = saved_models[family]
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "convert", str(src), str(out), "--capacity", "0.25", "--layers", "all", "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["routed"] == [0, 1, 2, 3] and summary["capacities"] == [0.25] * 4

    in_memory = modify.convert(AutoModelForCausalLM.from_pretrained(src).eval(), capacity=0.25, layers="all")
    loaded = modify.from_pretrained(out)
    via_transformers = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 97, (2, 20))
    with torch.no_grad():
        expected = in_memory(ids).logits
        assert torch.equal(loaded(ids).logits, expected)
        assert torch.equal(via_transformers(ids).logits, expected)
    assert [b.capacity for b in modify.find_blocks(loaded)] == [0.25] * 4
    assert not getattr(loaded, "is_quantized", False)
    card = (out / "README.md").read_text()
    assert f"`{src.name}`" in card and str(src) not in card and "FLOPs per token" in card  # no local path
    assert _run(capsys, "verify", str(out), "--source", str(src))[0] == 0


def test_trained_routers_survive_the_round_trip(saved_models: dict, tmp_path: Path) -> None:
    from modify.io.checkpoint import load_source, resolve_source, save_converted

    source = resolve_source(str(saved_models["llama"]))
    model, tokenizer = load_source(source)
    modify.convert(model, capacity=0.5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_()
    save_converted(model, tokenizer, tmp_path / "out", source)
    loaded = modify.from_pretrained(tmp_path / "out")
    ids = torch.randint(3, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert torch.equal(loaded.model.layers[1].mod_router.weight, model.model.layers[1].mod_router.weight)


def _truncated_safetensors(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    weights = dest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return dest


def _bad_config(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    (dest / "config.json").write_text("{not json")
    return dest


def _one_block(src: Path, dest: Path) -> Path:
    tiny_model("gpt2", n_layer=1).save_pretrained(dest)
    return dest


def _empty_dir(src: Path, dest: Path) -> Path:
    dest.mkdir()
    (dest / "notes.txt").write_text("no model here")
    return dest


def _bad_gguf(src: Path, dest: Path) -> Path:
    """A well-formed GGUF with one tensor, cut in the middle of the tensor data."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(dest), "llama")
    writer.add_tensor("token_embd.weight", np.random.rand(97, 32).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    dest.write_bytes(dest.read_bytes()[: dest.stat().st_size - 4000])
    return dest


SOURCE_CASES = {
    "missing path": (lambda src, dest: dest / "nowhere", 1, "does not exist"),
    "no model in directory": (_empty_dir, 1, "has no config.json"),
    "truncated safetensors": (_truncated_safetensors, 1, "is truncated"),
    "corrupted gguf": (_bad_gguf, 1, "is not a readable GGUF file"),
    "config not json": (_bad_config, 1, "is not valid JSON"),
    "no routable blocks": (_one_block, 1, "no nn.ModuleList of two or more blocks"),
}
ARG_CASES = {
    "capacity below zero": (["--capacity", "-0.1"], 2, "capacity -0.1 is out of range; use a value in [0, 1]"),
    "capacity above one": (["--capacity", "1.5"], 2, "capacity 1.5 is out of range"),
    "capacity not a number": (["--capacity", "lots"], 2, "capacity 'lots' is not a number"),
    "layer out of range": (["--layers", "1,9"], 2, "block index 9 is out of range: valid indices are 0..3"),
    "malformed layers": (["--layers", "1,,x"], 2, "malformed --layers"),
    "backwards range": (["--layers", "5-2"], 2, "malformed --layers"),
    "skip rank zero": (["--skip-path", "linear", "--skip-rank", "0"], 2, "skip rank 0 must be a positive integer"),
    "unknown skip path": (["--skip-path", "conv"], 2, "invalid choice: 'conv'"),
    "skip path with a plan": (
        ["--plan", "plan.json", "--skip-path", "mlp"],
        2,
        "--skip-path comes from the plan with --plan; calibrate with --skip-path instead",
    ),
}


def _assert_failed(code: int, err: str, expected_code: int, message: str, out: Path) -> None:
    assert code == expected_code
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("modify convert: error: ") and message in lines[0]
    assert "Traceback" not in err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))


@pytest.mark.parametrize("case", list(SOURCE_CASES))
def test_bad_sources(case: str, saved_models: dict, tmp_path: Path, capsys) -> None:
    make, expected_code, message = SOURCE_CASES[case]
    suffix = ".gguf" if "gguf" in case else ""
    src = make(saved_models["llama"], tmp_path / f"src{suffix}")
    before = tree_digest(src) if src.exists() else None
    out = tmp_path / "out"
    code, _, err = _run(capsys, "convert", str(src), str(out))
    _assert_failed(code, err, expected_code, message, out)
    assert (tree_digest(src) if src.exists() else None) == before


@pytest.mark.parametrize("case", list(ARG_CASES))
def test_bad_arguments(case: str, saved_models: dict, tmp_path: Path, capsys) -> None:
    flags, expected_code, message = ARG_CASES[case]
    src = saved_models["llama"]
    before = tree_digest(src)
    out = tmp_path / "out"
    code = None
    try:
        code = main(["convert", str(src), str(out), *flags])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    _, err = capsys.readouterr()
    _assert_failed(
        code, err.replace(f"convert: error: argument {flags[0]}: ", "convert: error: "), expected_code, message, out
    )
    assert tree_digest(src) == before


def test_output_problems(saved_models: dict, tmp_path: Path, capsys) -> None:
    src = saved_models["llama"]
    before = tree_digest(src)
    existing = tmp_path / "exists"
    existing.mkdir()
    code, _, err = _run(capsys, "convert", str(src), str(existing))
    assert code == 1 and "already exists; pass --force" in err and not any(existing.iterdir())

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = _run(capsys, "convert", str(src), str(blocker / "out"))
    assert code == 1 and "is not a directory" in err and blocker.read_text() == "x"

    code, _, err = _run(capsys, "convert", str(src), str(src / "inside"))
    assert code == 1 and "inside SRC" in err
    code, _, err = _run(capsys, "convert", str(src), str(src))
    assert code == 1 and "is SRC" in err
    assert tree_digest(src) == before


def test_missing_parents_are_created_and_removed_again_on_failure(saved_models: dict, tmp_path: Path, capsys) -> None:
    """OUT in directories that don't exist yet works, as save_pretrained does; a failed write leaves none."""
    from modify.io.checkpoint import atomic_directory

    out = tmp_path / "runs" / "today" / "mod"
    code, _, err = _run(capsys, "convert", str(saved_models["llama"]), str(out), "-q")
    assert code == 0, err
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()

    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "new" / "deeper" / "mod") as tmp:
        (tmp / "partial.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert not (tmp_path / "new").exists()


def test_force_replaces_out_only_when_complete(saved_models: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert _run(capsys, "convert", str(saved_models["gpt2"]), str(out))[0] == 0
    assert _run(capsys, "convert", str(saved_models["llama"]), str(out), "--force", "-q")[0] == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert not list(tmp_path.glob(".out.*"))


def test_full_disk_while_saving_writes_nothing(saved_models: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    import transformers

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "out"
    code, _, err = _run(capsys, "convert", str(saved_models["llama"]), str(out))
    _assert_failed(code, err, 1, "no space left on the device while writing", out)


def test_converted_source_is_refused(saved_models: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert _run(capsys, "convert", str(saved_models["llama"]), str(out), "-q")[0] == 0
    code, _, err = _run(capsys, "convert", str(out), str(tmp_path / "again"))
    _assert_failed(code, err, 1, "is already converted", tmp_path / "again")


def test_uncached_model_id_is_not_downloaded(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code, _, err = _run(capsys, "convert", "someone/not-a-cached-model", str(tmp_path / "out"))
    _assert_failed(code, err, 1, "is not in the local Hugging Face cache and nothing is downloaded", tmp_path / "out")
