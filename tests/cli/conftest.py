from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from modify.testing import tiny_model


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random checkpoints saved as Hugging Face directories, one per family."""
    root = tmp_path_factory.mktemp("sources")
    paths = {}
    for family in ("llama", "gpt2", "gemma2", "phi", "opt"):
        paths[family] = root / family
        tiny_model(family).save_pretrained(paths[family])
    return paths


def tree_digest(path: Path) -> str:
    """A digest of every file under ``path`` (names and bytes), to prove a source was not modified."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()
