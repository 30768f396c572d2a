"""``modify generate``: the continuation on stdout, causal routing by default, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modify.cli import main
from modify.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama with a tokenizer, and its conversion at capacity 1.0 and at 0.5 (every other block)."""
    root = tmp_path_factory.mktemp("generate-models")
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = "<unk>"
    paths = {"dense": root / "dense", "full": root / "full", "half": root / "half"}
    tiny_model("llama").save_pretrained(paths["dense"])
    tokenizer.save_pretrained(paths["dense"])
    assert main(["convert", str(paths["dense"]), str(paths["full"]), "--capacity", "1.0", "--layers", "all", "-q"]) == 0
    assert main(["convert", str(paths["dense"]), str(paths["half"]), "--capacity", "0.5", "-q"]) == 0
    return paths


def generate(model: Path, *extra: str, capsys) -> dict:  # type: ignore[no-untyped-def]
    assert main(["generate", str(model), "--prompt", "the cat sat", "--max-new-tokens", "8", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_capacity_one_continues_like_the_dense_model(models: dict, capsys) -> None:
    dense = generate(models["dense"], capsys=capsys)
    full = generate(models["full"], capsys=capsys)
    assert dense["routing"] == "dense" and full["routing"] == "causal"
    assert full["text"] == dense["text"] and full["new_tokens"] == 8
    assert all(share == 1.0 for share in full["processed_share"].values())
    sampled = [generate(models["full"], "--sample", "--seed", "3", capsys=capsys)["text"] for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded


def test_fresh_routers_route_about_their_capacity(models: dict, capsys) -> None:
    """A fresh conversion (capacity 0.5): the prompt sets each threshold, so about half the positions are
    processed, and the output says the routers are uncalibrated."""
    half = generate(models["half"], capsys=capsys)
    assert set(half["processed_share"]) == {"1", "3"}  # the routed blocks' cache layers
    assert all(0.25 <= share <= 0.75 for share in half["processed_share"].values()), half["processed_share"]
    assert half["uncalibrated_blocks"] == [1, 3]
    assert main(["generate", str(models["half"]), "--prompt", "the cat sat", "--max-new-tokens", "4"]) == 0
    assert "blocks [1, 3] are uncalibrated" in capsys.readouterr().err
    assert generate(models["full"], capsys=capsys)["uncalibrated_blocks"] == []  # capacity 1.0 decides nothing


def test_text_goes_to_stdout(models: dict, capsys) -> None:
    assert main(["generate", str(models["half"]), "--prompt", "the cat", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() != "" and "tok/s" in captured.err and "processed" in captured.err


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--max-new-tokens", "0"], 2, "at least 1"),
        (["--sample", "--temperature", "0"], 2, "must be > 0"),
        (["--top-p", "1.5"], 2, "in (0, 1]"),
        (["--chat"], 2, "no chat template"),
        (["--routing", "topk", "--dense"], 2, "is dense"),
        (["--prompt-file", "missing.txt"], 1, "does not exist"),
        (["--empty"], 2, "the prompt is empty"),
    ],
)
def test_bad_inputs_get_one_line(models: dict, extra: list[str], code: int, message: str, capsys) -> None:
    model = models["dense"] if "--dense" in extra else models["half"]
    extra = [e for e in extra if e != "--dense"]
    prompt = ["--prompt", "the cat"]
    if "--prompt-file" in extra:
        prompt = []
    if "--empty" in extra:
        prompt, extra = ["--prompt", "  "], []
    assert main(["generate", str(model), *prompt, *extra]) == code
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("modify generate: error: ") and message in captured.err
