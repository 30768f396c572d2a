from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter. It must be chosen before any triton kernel
# is defined, i.e. before modify's kernel modules are imported: conftest is imported first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct and its tokenizer (fetched once into the cache; see modify.io.assets)."""
    from modify.io.assets import load_smollm2

    return load_smollm2()
