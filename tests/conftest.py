from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct and its tokenizer (fetched once into the cache; see modify.assets)."""
    from modify.assets import load_smollm2

    return load_smollm2()
