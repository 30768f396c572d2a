from __future__ import annotations

import random
from pathlib import Path

import pytest

from modify.cli import main
from modify.testing import tiny_model, tiny_tokenizer

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it", "was", "red", "blue"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama (vocabulary 98, eos 97) and its conversion at capacity 0.5 on blocks 1 and 3 (also with
    kv='all'), a conversion at capacity 1.0 on every block, and a directory of 16 short text documents."""
    root = tmp_path_factory.mktemp("train-inputs")
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "<eos>"})
    src = root / "src"
    tiny_model("llama", vocab_size=98).save_pretrained(src)
    tokenizer.save_pretrained(src)
    paths = {"src": src, "converted": root / "converted", "full": root / "full", "data": root / "data"}
    paths["kv_all"] = root / "kv_all"
    assert main(["convert", str(src), str(paths["converted"]), "--capacity", "0.5", "-q"]) == 0
    assert main(["convert", str(src), str(paths["full"]), "--capacity", "1.0", "--layers", "all", "-q"]) == 0
    assert main(["convert", str(src), str(paths["kv_all"]), "--capacity", "0.5", "--kv", "all", "-q"]) == 0
    rng = random.Random(0)
    paths["data"].mkdir()
    for i in range(16):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 90)))
        (paths["data"] / f"doc{i:02d}.txt").write_text(words + ".\n")
    return paths


def train_args(inputs: dict[str, Path], out: Path, *extra: str, model: str = "converted") -> list[str]:
    """The argv of a small, fast run (float32, so that results compare exactly)."""
    return [
        "train", str(inputs[model]), "--data", str(inputs["data"]), "--out", str(out), "--steps", "4",
        "--seq-len", "16", "--batch-size", "2", "--eval-fraction", "0.25", "--eval-tokens", "64",
        "--autocast", "none", "-q", *extra,
    ]  # fmt: skip
