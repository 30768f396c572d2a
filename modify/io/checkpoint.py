"""Checkpoints in and out: resolve and validate a source, load it, save a converted model atomically.

Sources: a Hugging Face model directory (safetensors, sharded or not, or .bin), a single ``.gguf`` file
(dequantised by transformers), a model id already in the local Hugging Face cache (nothing is downloaded),
or ``smollm2``, the default real checkpoint (SmolLM2-135M-Instruct, see :mod:`modify.io.assets`).

A converted directory holds config.json (with the plan under ``mixture_of_depths`` and a
``quantization_config`` of method "modify", the hook through which ``AutoModelForCausalLM.from_pretrained``
restores the routing once ``modify`` is imported; see :mod:`modify.io.hf_integration`), safetensors weights
including the routers, the tokenizer, and a model card.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modify.config import CONFIG_KEY, LOAD_MARKER_KEY, MoDConfig
from modify.errors import ModifyError
from modify.flops import flops
from modify.io.assets import AssetError, smollm2_gguf
from modify.modes import sync_plan

__all__ = [
    "Source",
    "resolve_source",
    "load_source",
    "save_converted",
    "write_converted",
    "from_pretrained",
    "atomic_directory",
    "atomic_file",
    "validate_source",
    "check_parent",
    "file_record",
    "DEFAULT_SOURCE",
]

#: The SRC that names the default real checkpoint.
DEFAULT_SOURCE = "smollm2"
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


@dataclass(frozen=True)
class Source:
    """A resolved checkpoint.

    Attributes:
        kind: "directory", "gguf", "hub-cache" or "smollm2".
        path: the directory, or the .gguf file (to load it; never recorded, see :meth:`to_dict`).
        model_id: the Hugging Face id for "hub-cache".
    """

    kind: str
    path: Path
    model_id: str = ""

    @property
    def directory(self) -> Path:
        return self.path.parent if self.path.suffix == ".gguf" else self.path

    def load_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.path.name} if self.path.suffix == ".gguf" else {}

    def files(self) -> list[Path]:
        """The files that make the checkpoint: the .gguf, or the directory's config.json and weights."""
        if self.path.suffix == ".gguf":
            return [self.path]
        patterns = ("config.json", *_WEIGHT_PATTERNS)
        return sorted({p for pattern in patterns for p in self.path.glob(pattern) if p.is_file()})

    def to_dict(self) -> dict[str, Any]:
        """The record a converted model and a plan keep: kind, model id, name and each file's name, size and
        SHA-256. Never a local path: a published checkpoint would carry it (``modify verify --source`` or
        the model id finds the source again, and the hashes tell it is the same one)."""
        record: dict[str, Any] = {"kind": self.kind, "model_id": self.model_id, "name": self.path.name}
        if self.path.suffix == ".gguf":
            record["gguf_file"] = self.path.name
        record["files"] = [file_record(p) for p in self.files()]
        return record

    def mismatch(self, record: dict[str, Any]) -> str:
        """How this checkpoint's files differ from ``record`` (a :meth:`to_dict`), or "" when they don't.

        A record without files (written before they were recorded) has nothing to check. Sizes are compared
        before anything is hashed, so a wrong checkpoint is told at once.
        """
        recorded = record.get("files")
        if recorded is None:
            return ""
        mine = self.files()
        if record.get("gguf_file") and self.path.suffix == ".gguf":
            pairs = [(recorded[0], self.path)]  # one file each side; a renamed copy is still the same file
        else:
            by_name = {p.name: p for p in mine}
            missing = [f["name"] for f in recorded if f["name"] not in by_name]
            if missing:
                return f"it has no {missing[0]}"
            pairs = [(f, by_name[f["name"]]) for f in recorded]
        for f, p in pairs:
            if p.stat().st_size != f["size"]:
                return f"{p.name} has {p.stat().st_size} bytes, the recorded {f['name']} {f['size']}"
        for f, p in pairs:
            if file_record(p)["sha256"] != f["sha256"]:
                return f"the SHA-256 of {p.name} differs from the recorded {f['name']}'s"
        return ""


#: (resolved path, size, mtime) -> SHA-256: a file recorded twice in one run (convert --calibrate, a
#: verify that checks the record it just wrote) is read once.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_record(path: Path) -> dict[str, Any]:
    """``{"name", "size", "sha256"}`` of a file: what identifies it without saying where it is."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return {"name": path.name, "size": stat.st_size, "sha256": _DIGESTS[key]}


def source_label(record: dict[str, Any]) -> str:
    """How a source record reads in a card or a message: its model id, else its file or directory name."""
    name = record.get("name") or (Path(record["path"]).name if record.get("path") else "")
    return record.get("model_id") or record.get("gguf_file") or name or "unknown"


def _looks_like_model_id(src: str) -> bool:
    parts = src.split("/")
    return len(parts) <= 2 and all(parts) and not src.startswith((".", "/", "~"))


def resolve_source(src: str) -> Source:
    """Find what ``src`` names, without loading it. Raises ModifyError with the fix when it names nothing."""
    path = Path(src).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            return Source("directory", path)
        if path.suffix == ".gguf":
            return Source("gguf", path)
        raise ModifyError(
            f"{src} is a file but not a .gguf file; give a model directory, a .gguf file or a cached model id"
        )
    if src == DEFAULT_SOURCE:
        try:
            return Source("smollm2", smollm2_gguf().resolve())
        except AssetError as exc:
            raise ModifyError(str(exc)) from None
    if _looks_like_model_id(src) and "/" in src:
        # optional dependency: huggingface_hub, with transformers (import modify works on plain torch models)
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Source("hub-cache", Path(snapshot_download(src, local_files_only=True)), model_id=src)
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise ModifyError(
                f"model id {src} is not in the local Hugging Face cache and nothing is downloaded; "
                f"fetch it first (hf download {src}) or pass a local directory"
            ) from None
    raise ModifyError(
        f"{src} does not exist; give a model directory, a .gguf file, a cached model id or '{DEFAULT_SOURCE}'"
    )


def _check_safetensors(path: Path) -> None:
    """Header readable and file long enough for every tensor it declares (catches truncation)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise ModifyError(
            f"{path} is not a readable safetensors file ({exc}); it may be corrupted: fetch it again"
        ) from None
    if 8 + length + end > size:
        raise ModifyError(f"{path} is truncated ({size} of {8 + length + end} bytes); fetch it again")


def validate_source(source: Source) -> None:
    """Raise ModifyError (with the fix) when ``source`` can't be a model: no config, no weights, a damaged file."""
    if source.path.suffix == ".gguf":
        from gguf import GGUFReader  # optional dependency: gguf, for .gguf sources (import modify works without it)

        try:
            GGUFReader(source.path)
        except Exception as exc:  # the reader raises ValueError, IndexError, struct.error...
            raise ModifyError(
                f"{source.path} is not a readable GGUF file ({type(exc).__name__}); it may be truncated: fetch it again"
            ) from None
        return
    config = source.path / "config.json"
    if not config.is_file():
        raise ModifyError(
            f"{source.path} has no config.json; point SRC at a Hugging Face model directory or a .gguf file"
        )
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModifyError(f"{config} is not valid JSON ({exc}); repair or re-download it") from None
    weights = [p for pattern in _WEIGHT_PATTERNS for p in source.path.glob(pattern)]
    if not weights:
        raise ModifyError(
            f"{source.path} has no weights (*.safetensors or *.bin); it is not a complete model directory"
        )
    for p in weights:
        if p.suffix == ".safetensors":
            _check_safetensors(p)


def load_tokenizer(source: Source) -> Any:
    """The source's tokenizer, or None when it carries none (a model directory need not)."""
    # optional dependency: transformers (import modify works on plain torch models without it)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.directory, **source.load_kwargs())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_source(source: Source, dtype: str | None = None) -> tuple[nn.Module, Any]:
    """Load the model (with its routing, for a converted directory) and its tokenizer, if any."""
    # optional dependency: transformers (import modify works on plain torch models without it)
    from transformers import AutoModelForCausalLM

    validate_source(source)
    torch_dtype: Any = getattr(torch, dtype) if dtype else ("auto" if source.path.suffix != ".gguf" else torch.float32)
    try:
        if is_converted_directory(source):
            model = from_pretrained(source.path, dtype=torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch_dtype, **source.load_kwargs())
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModifyError(f"cannot load {source.path}: {first[:300]}") from exc
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and source.path.suffix == ".gguf":
        # transformers dequantises GGUF weights on load but keeps the model marked as quantized, which
        # forbids saving it; the weights in memory are plain floating point.
        quantizer.remove_quantization_config(model)
    return model.eval(), load_tokenizer(source)


def check_output(out: Path, source: Source | None, force: bool) -> None:
    """Refuse an OUT that exists (without force), equals or lies inside SRC, or can't be created."""
    out = out.expanduser().resolve()
    if source is not None:
        src = source.path
        if out == src or (src.is_dir() and src in out.parents):
            raise ModifyError(
                f"OUT {out} is {'SRC' if out == src else 'inside SRC'}; "
                "the source is never modified: choose another OUT"
            )
    if out.exists() and not force:
        raise ModifyError(f"{out} already exists; pass --force to replace it or choose another OUT")
    check_parent(out)


def check_parent(out: Path) -> None:
    """Refuse an output whose missing parent directories can't be created (as ``mkdir -p`` would)."""
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ModifyError(f"cannot create {out}: {ancestor} is not a directory; choose another path")
    if not os.access(ancestor, os.W_OK):
        raise ModifyError(f"cannot create {out}: {ancestor} is not writable; choose another path")


def atomic_file(path: Path, write: Any) -> None:
    """Call ``write(tmp)`` on a hidden file beside ``path``, then rename it to ``path``: all or nothing."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it becomes ``out`` by a rename.

    Missing parent directories are created, as ``save_pretrained`` does (:func:`check_parent` tells early
    whether they can be). On any failure or interrupt the temporary directory, and the parents created for
    it, are removed and ``out`` is untouched: an existing ``out`` (with force) is replaced only after the new
    one is complete.
    """
    out = out.expanduser().resolve()
    created = [p for p in out.parents if not p.exists()]  # innermost first
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            if not force:
                raise ModifyError(f"{out} appeared while converting; pass --force to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.rename(out, old / "out")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ModifyError(
                f"no space left on the device while writing {out}; free space or choose another OUT"
            ) from None
        raise ModifyError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not out.exists():
            for parent in created:
                with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
                    parent.rmdir()


_CAUSAL_CARD = {
    "threshold": "a token is processed when its router score exceeds the block's threshold",
    "aux": "a token is processed when its router score is positive",
    "predictor": "a token is processed when the block's predictor says so",
}


CARD_SEQ_LEN = 2048


def _model_card(model: nn.Module, plan: MoDConfig, trained: str = "", count: Any = None) -> str:
    seq_len = CARD_SEQ_LEN
    count = count or flops(model, seq_len)
    routed = ", ".join(
        f"{i} ({c:g}" + (f", skip path {p})" if p != "identity" else ")")
        for i, c, p in zip(plan.routed, plan.capacities, plan.skip_paths)
    )
    with_path = any(p != "identity" for p in plan.skip_paths)
    skipped = "their block's skip path, an estimate of its contribution" if with_path else "nothing (pure MoD)"
    return f"""---
library_name: transformers
tags: [mixture-of-depths, modify]
---
# Mixture-of-Depths conversion

Converted with [modify](https://pypi.org/project/modify/) from `{source_label(plan.source)}` \
({plan.source.get("kind", "unknown")}).

- Routed blocks (capacity): {routed} of {plan.num_blocks}
- Router: {plan.router}, gate: {plan.gate} (every gate starts at exactly 1)
- Skipped tokens get: {skipped}
- Sampling (`generate()`): causal routing, rule `{plan.causal}` ({_CAUSAL_CARD[plan.causal]})
- Forward FLOPs per token at {seq_len} tokens (skip paths included): dense {count.dense / seq_len:,.0f}, \
routed {count.routed / seq_len:,.0f} ({count.ratio:.1%})

Load with `import modify; modify.from_pretrained(path)`, or with `AutoModelForCausalLM.from_pretrained(path)`
after `import modify`. {trained or "The routers are untrained: train before use."}
"""


def _drop_local_paths(plan: MoDConfig) -> None:
    """Forget the local paths older versions recorded (the source's ``path``, calibration files by path), so
    that retraining or re-saving an old checkpoint does not publish them again."""
    plan.source.pop("path", None)
    data = plan.calibration.get("data", {})
    if "files" in data:
        data["files"] = [{"name": Path(f).name} if isinstance(f, str) else f for f in data["files"]]


def write_converted(
    model: nn.Module,
    tokenizer: Any,
    directory: Path,
    source: Source | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    trained: str = "",
    flop_count: Any = None,
) -> None:
    """Write a converted model into the existing ``directory``: weights, config with the plan, tokenizer, card.

    ``source`` defaults to the one the plan already records (a trained model keeps the checkpoint it was
    converted from); ``state_dict`` replaces the model's own (a sharded model's gathered weights); ``trained``
    says in the card how the model was trained; ``flop_count`` is ``modify.flops(model, CARD_SEQ_LEN)`` if already
    counted (a sharded model is counted by all its processes together, before one of them writes).
    """
    sync_plan(model)  # thresholds that training's running statistics moved
    plan = MoDConfig.from_dict(getattr(model.config, CONFIG_KEY))
    if source is not None:
        plan.source = source.to_dict()
    _drop_local_paths(plan)
    setattr(model.config, CONFIG_KEY, plan.to_dict())
    # convert put the loading hook's marker on the config, so config.json carries it (as any save_pretrained's).
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / "README.md").write_text(_model_card(model, plan, trained, flop_count))


def save_converted(model: nn.Module, tokenizer: Any, out: Path, source: Source, force: bool = False) -> Path:
    """Save a converted model to ``out`` atomically: weights with routers, config with the plan, tokenizer, card."""
    out = Path(out)
    with atomic_directory(out, force) as tmp:
        write_converted(model, tokenizer, tmp, source)
    return out.expanduser().resolve()


def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load a directory written by ``modify convert``: the model with its routing and trained routers."""
    # optional dependency: transformers, as modify.io.hf_integration (the loading hook, registered on import);
    # import modify works on plain torch models without it
    from transformers import AutoModelForCausalLM

    from modify.io.hf_integration import ModifyLoadConfig

    directory = Path(path)
    config = directory / "config.json"
    if not config.is_file():
        raise ModifyError(f"{directory} has no config.json; is it a directory written by 'modify convert'?")
    saved = json.loads(config.read_text())
    if CONFIG_KEY not in saved:
        raise ModifyError(
            f"{directory} has no Mixture-of-Depths plan in config.json; convert it with 'modify convert' first"
        )
    if LOAD_MARKER_KEY not in saved:
        # Saved by a release whose save_pretrained dropped the marker: name the hook here instead.
        kwargs.setdefault(LOAD_MARKER_KEY, ModifyLoadConfig())
    return AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()


def is_converted_directory(source: Source) -> bool:
    config = source.path / "config.json"
    if source.path.suffix == ".gguf" or not config.is_file():
        return False
    try:
        return CONFIG_KEY in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def load_any(src: str, dtype: str | None = None) -> tuple[nn.Module, Any, Source, bool]:
    """Load a source or a converted directory: ``(model, tokenizer, source, converted)``."""
    source = resolve_source(src)
    model, tokenizer = load_source(source, dtype)
    return model, tokenizer, source, is_converted_directory(source)
