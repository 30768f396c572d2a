"""``modify convert smollm2`` on the real GGUF checkpoint, loaded back and verified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import modify
from modify.cli import main

pytestmark = pytest.mark.slow


def test_smollm2_gguf_round_trip(smollm2, tmp_path: Path, capsys) -> None:
    model, tokenizer = smollm2
    out = tmp_path / "smollm2-mod"
    assert main(["convert", "smollm2", str(out), "-q"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["mixture_of_depths"]["routed"] == list(range(1, 30, 2))
    assert config["mixture_of_depths"]["source"]["kind"] == "smollm2"

    ids = tokenizer(["Now is the winter of our discontent made glorious summer"], return_tensors="pt").input_ids
    modify.convert(model)
    try:
        with torch.no_grad():
            expected = model(ids).logits
    finally:
        modify.revert(model)
    loaded = modify.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)

    capsys.readouterr()
    assert main(["verify", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"], report
