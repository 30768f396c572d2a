"""The data pipeline of ``modify train``: text files in, fixed-length token sequences out, by streaming.

Files are plain text (one document per file) or JSON lines (``.jsonl``: one document per line, its text in
the ``"text"`` field). :class:`PackedStream` tokenises documents (a huge one in ~1 MB pieces cut at line
ends), appends the end-of-text id after each, packs the stream into sequences of exactly ``seq_len`` tokens
and shuffles them through a bounded buffer, so a corpus larger than memory trains. Everything is
deterministic for a seed: the held-out split (by document, see :func:`in_eval_split`, or by token window
where there are too few documents, see :func:`held_out_window`), the order of each epoch, each rank's share,
and the position saved by :meth:`PackedStream.state_dict`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modify.errors import ModifyError

__all__ = [
    "DOC_SUFFIXES_JSONL",
    "TEXT_SUFFIXES",
    "Document",
    "PackedStream",
    "collect_files",
    "held_out_window",
    "in_eval_split",
    "iter_documents",
]

#: Files read as JSON lines: one document per line, its text in the "text" field.
DOC_SUFFIXES_JSONL = (".jsonl",)
#: What a directory is searched for (recursively; hidden files and folders are skipped).
TEXT_SUFFIXES = (".txt", ".text", ".md", *DOC_SUFFIXES_JSONL)
#: A plain-text document is read and tokenised this many characters at a time (extended to the line's end).
CHUNK_CHARS = 1 << 20
_SPLITS = {"all": "the data", "train": "the training split", "eval": "the eval split"}
_JSONL_FIX = 'each line of a .jsonl file must be one JSON object with a string "text" field'


def collect_files(paths: Sequence[str | Path]) -> list[Path]:
    """The text files that ``paths`` name, resolved, sorted and de-duplicated.

    A directory is searched recursively for ``*.txt``, ``*.text``, ``*.md`` and ``*.jsonl`` (hidden entries
    skipped); any file named explicitly is read, as JSON lines if it ends in ``.jsonl``, else as plain text.
    Raises ModifyError for a missing path, a directory without text files, or when every file is empty.
    """
    if not paths:
        raise ModifyError("no data given: pass text files, .jsonl files or directories holding them")
    found: set[Path] = set()
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise ModifyError(f"data path {given} does not exist: check the path")
        path = path.resolve()
        if not path.is_dir():
            found.add(path)
            continue
        matches = [p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file()]
        matches = [p for p in matches if not any(part.startswith(".") for part in p.relative_to(path).parts)]
        if not matches:
            raise ModifyError(
                f"directory {given} has no text files (*.txt, *.text, *.md, *.jsonl): add some or name the files"
            )
        found.update(p.resolve() for p in matches)
    files = sorted(found)
    if all(p.stat().st_size == 0 for p in files):
        raise ModifyError(f"every data file is empty ({len(files)} files, first {files[0]}): give files with text")
    return files


@dataclass(frozen=True)
class Document:
    """One document: ``id`` is the file's path, or ``path:LINE`` (1-based) for a line of a .jsonl file."""

    id: str
    text: str


def _text_chunks(path: Path, chunk_chars: int) -> Iterator[str]:
    """A plain-text file in pieces of about ``chunk_chars`` characters (at most four times that), each
    ending at a line end, or for a line longer than a piece, at a space where there is one."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        carry = ""
        while True:
            piece = carry + f.read(chunk_chars)
            carry = ""
            if not piece:
                return
            if piece[-1] not in "\r\n":
                tail = f.readline(chunk_chars)
                piece += tail
                if len(tail) == chunk_chars and tail[-1] not in "\r\n":  # a line longer than a piece
                    cut = piece.rfind(" ") + 1
                    if cut > len(piece) // 2:
                        piece, carry = piece[:cut], piece[cut:]
            yield piece


def _pieces(
    files: Iterable[Path], keep: Callable[[str], bool] | None = None, chunk_chars: int = CHUNK_CHARS
) -> Iterator[tuple[str, str, bool]]:
    """(document id, text piece, whether the document ends here) for each non-empty document ``keep`` accepts.

    Streams: a jsonl line is parsed only when its document is kept, and a plain-text file is read in pieces.
    """
    for path in files:
        if path.suffix.lower() in DOC_SUFFIXES_JSONL:
            with open(path, encoding="utf-8", errors="replace") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    doc_id = f"{path}:{lineno}"
                    if keep is not None and not keep(doc_id):
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ModifyError(f"{path}:{lineno}: not valid JSON ({exc.msg}): {_JSONL_FIX}") from None
                    text = record.get("text") if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise ModifyError(f'{path}:{lineno}: no string "text" field: {_JSONL_FIX}')
                    if text:
                        yield doc_id, text, True
            continue
        doc_id = str(path)
        if keep is not None and not keep(doc_id):
            continue
        previous = None
        for piece in _text_chunks(path, chunk_chars):
            if previous is not None:
                yield doc_id, previous, False
            previous = piece
        if previous is not None:
            yield doc_id, previous, True


def iter_documents(files: Sequence[Path]) -> Iterator[Document]:
    """The non-empty documents of ``files`` in order: a plain-text file is one document, a jsonl line another.

    Raises ModifyError naming ``file:line`` for a jsonl line that is not JSON or has no string "text" field.
    """
    parts: list[str] = []
    for doc_id, piece, last in _pieces(Path(f).resolve() for f in files):
        parts.append(piece)
        if last:
            yield Document(doc_id, "".join(parts))
            parts = []


def in_eval_split(doc_id: str, eval_fraction: float, seed: int = 0) -> bool:
    """Whether the document belongs to the held-out split: sha256 of ``f"{seed}:{doc_id}"`` below the fraction."""
    if eval_fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def held_out_window(index: int, eval_fraction: float) -> bool:
    """Whether token window ``index`` is held out when the split falls back to windows: window 0, then evenly
    spread ones, ``ceil(n * eval_fraction)`` of the first n in all (so even a short text holds one out)."""
    return math.ceil((index + 1) * eval_fraction) > math.ceil(index * eval_fraction)


class PackedStream:
    """Sequences of exactly ``seq_len`` token ids from text files, packed across document boundaries.

    Args:
        files: from :func:`collect_files`.
        tokenizer: a Hugging Face tokenizer (called as ``tokenizer(texts, add_special_tokens=False)``).
        seq_len: tokens per sequence.
        seed: fixes the order: epoch e shuffles the file order with ``random.Random(seed * 1000003 + e)`` and
            passes sequences through a shuffle buffer seeded from (seed, e).
        split: "all", "train" (documents not held out) or "eval" (those held out, see :func:`in_eval_split`;
            the split hashes with seed 0 whatever ``seed`` is, so the held-out set stays put across seeds).
            Where that leaves either side without a sequence per rank (a single file is one document), the
            split is by token window instead (``by_windows``): every document packed in file order, the windows
            :func:`held_out_window` picks held out, the rest trained on (the files' order is then not shuffled
            per epoch, so the windows stay put; the shuffle buffer still mixes the training ones).
        eval_fraction: the fraction of documents (or windows) held out.
        rank, world_size: global sequence i goes to rank ``i % world_size``; a pass's last group of fewer than
            ``world_size`` sequences is dropped, so every rank gets the same number per pass.
        loop: repeat epochs forever; else one pass (epoch 0) per iteration.
        shuffle: shuffle file order and sequences; else the files' order, sequences in order.
        eos_id: the end-of-text id appended after each document; default ``tokenizer.eos_token_id``.
        shuffle_buffer: sequences held by the shuffle buffer (1 or less: no sequence shuffling).

    With ``loop`` an iteration continues from the current position (see :meth:`state_dict`), so a second
    ``for`` loop picks up where the first stopped; without it each iteration is a whole pass from the start,
    or from the position last given to :meth:`load_state_dict`. Use one iterator at a time.
    """

    def __init__(
        self,
        files: Sequence[Path],
        tokenizer: Any,
        seq_len: int,
        *,
        seed: int = 0,
        split: str = "all",
        eval_fraction: float = 0.0,
        rank: int = 0,
        world_size: int = 1,
        loop: bool = True,
        shuffle: bool = True,
        eos_id: int | None = None,
        shuffle_buffer: int = 64,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
        if not 0.0 <= eval_fraction <= 1.0:
            raise ValueError(f"eval_fraction must lie in [0, 1], got {eval_fraction}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        if not files:
            raise ModifyError("no data files: pass text files, .jsonl files or directories holding them")
        self.files = sorted({Path(f).resolve() for f in files})
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.seed, self.split, self.eval_fraction = seed, split, eval_fraction
        self.rank, self.world_size = rank, world_size
        self.loop, self.shuffle, self.shuffle_buffer = loop, shuffle, shuffle_buffer
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
        if self.eos_id is None:
            raise ModifyError("the tokenizer has no eos token to end documents: give it an eos_token or pass eos_id")
        self._epoch, self._consumed, self._loaded = 0, 0, False
        self._count: int | None = None
        # Both sides of a train/eval split decide alike, so the two streams of a run always agree.
        self.by_windows = split != "all" and 0 < eval_fraction < 1 and not self._document_split_fills()
        self._check_enough()

    # -- the pipeline -------------------------------------------------------------------------------------

    @property
    def _need(self) -> int:
        return self.seq_len * self.world_size  # tokens for one sequence per rank

    def _keep(self, doc_id: str) -> bool:
        if self.split == "all" or self.by_windows:
            return True
        return in_eval_split(doc_id, self.eval_fraction) == (self.split == "eval")

    def _document_split_fills(self) -> bool:
        """Whether both sides of the split by document give every rank a sequence."""

        def side(held: bool) -> Callable[[str], bool]:
            return lambda doc_id: in_eval_split(doc_id, self.eval_fraction) == held

        return all(self._tokens(side(held)) >= self._need for held in (False, True))

    def _tokens(self, keep: Callable[[str], bool]) -> int:
        """Tokens of the documents ``keep`` accepts, counted up to ``_need``."""
        tokens = 0
        for ids in self._token_lists(self.files, keep):
            tokens += len(ids)
            if tokens >= self._need:
                break
        return tokens

    def _token_lists(self, files: Iterable[Path], keep: Callable[[str], bool] | None = None) -> Iterator[list[int]]:
        """Token ids piece by piece, the eos id after each document; pieces tokenised in batches of ~1 MB."""
        batch: list[tuple[str, bool]] = []
        size = 0  # characters in the batch

        def flush() -> Iterator[list[int]]:
            texts = [text for text, _ in batch]
            ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
            for tokens, (_, last) in zip(ids, batch):
                tokens = list(tokens)
                if last:
                    tokens.append(self.eos_id)
                yield tokens

        for _, piece, last in _pieces(files, keep or self._keep):
            batch.append((piece, last))
            size += len(piece)
            if size >= CHUNK_CHARS or len(batch) >= 1024:
                yield from flush()
                batch, size = [], 0
        if batch:
            yield from flush()

    def _packed(self, files: Iterable[Path]) -> Iterator[torch.Tensor]:
        """Sequences of ``seq_len`` tokens in stream order; the last partial one is dropped."""
        pending: list[int] = []
        for tokens in self._token_lists(files):
            pending.extend(tokens)
            n = len(pending) // self.seq_len
            if n:
                block = torch.tensor(pending[: n * self.seq_len], dtype=torch.long).view(n, self.seq_len)
                yield from (row.clone() for row in block)
                pending = pending[n * self.seq_len :]

    def _global(self, epoch: int) -> Iterator[torch.Tensor]:
        """The epoch's sequences in global (pre-sharding) order."""
        files = list(self.files)
        if self.shuffle and not self.by_windows:  # windows are cut in one fixed order, or they would overlap
            random.Random(self.seed * 1000003 + epoch).shuffle(files)
        sequences = self._packed(files)
        if self.by_windows:
            held = self.split == "eval"
            sequences = (s for i, s in enumerate(sequences) if held_out_window(i, self.eval_fraction) == held)
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from sequences
            return
        rng = random.Random(f"modify-shuffle-buffer:{self.seed}:{epoch}")
        buffer: list[torch.Tensor] = []
        for seq in sequences:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(seq)
                continue
            j = rng.randrange(len(buffer))
            yield buffer[j]
            buffer[j] = seq
        rng.shuffle(buffer)
        yield from buffer

    def _rank_sequences(self, epoch: int) -> Iterator[torch.Tensor]:
        """This rank's share of the epoch: sequence ``rank`` of each complete group of ``world_size``."""
        mine = None
        for i, seq in enumerate(self._global(epoch)):
            if i % self.world_size == self.rank:
                mine = seq
            if i % self.world_size == self.world_size - 1:
                assert mine is not None
                yield mine

    def _check_enough(self) -> None:
        """Read just far enough to know that every rank gets a sequence; else say what is missing."""
        ranks = f" x {self.world_size} ranks" if self.world_size > 1 else ""
        if self.by_windows:
            counts = [0, 0]  # windows trained on, held out
            for held in self._held_out_flags():
                counts[held] += 1
                if min(counts) >= self.world_size:
                    return
            raise ModifyError(
                f"the data ({self._documents()}, too few to split by document) makes {sum(counts)} windows of "
                f"--seq-len {self.seq_len}, too few to train on one and hold out one{ranks}: "
                "give more text, a shorter --seq-len or --eval-data"
            )
        tokens = self._tokens(self._keep)
        if tokens >= self._need:
            return
        if not any(last for _, _, last in _pieces(self.files, self._keep)):
            fix = {"all": "give files with text", "train": "lower --eval-fraction or give more documents"}
            fix["eval"] = f"raise --eval-fraction (now {self.eval_fraction}) or give more documents"
            raise ModifyError(f"{_SPLITS[self.split]} has no documents ({len(self.files)} files): {fix[self.split]}")
        raise ModifyError(
            f"{_SPLITS[self.split]} has {tokens} tokens, fewer than --seq-len {self.seq_len}{ranks}: "
            "give more data or a shorter --seq-len"
        )

    def _held_out_flags(self) -> Iterator[bool]:
        """For a split by windows: whether each window of the data, in order, is held out."""
        return (held_out_window(i, self.eval_fraction) for i, _ in enumerate(self._packed(self.files)))

    def _documents(self) -> str:
        docs = sum(last for _, _, last in _pieces(self.files))
        return "1 document" if docs == 1 else f"{docs} documents"

    def held_out_note(self) -> str | None:
        """One line on what a split by windows holds out and why (None for a split by document); reads the
        whole data once."""
        if not self.by_windows:
            return None
        held = total = 0
        for flag in self._held_out_flags():
            held, total = held + flag, total + 1
        return (
            f"eval split: {held} of {total} token windows held out ({held * self.seq_len:,} tokens), "
            f"by window because the data has {self._documents()}, too few to hold out "
            f"{self.eval_fraction * 100:g}% by document at --seq-len {self.seq_len}"
        )

    # -- iteration and state ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[torch.Tensor]:
        """LongTensor [seq_len] sequences from the current position on."""
        if not self.loop and not self._loaded:
            self._epoch, self._consumed = 0, 0
        self._loaded = False
        while True:
            skip = self._consumed
            produced = 0
            for seq in self._rank_sequences(self._epoch):
                produced += 1
                if skip:
                    skip -= 1
                    continue
                self._consumed += 1
                yield seq
            if produced == 0:
                raise ModifyError(f"{_SPLITS[self.split]} gave no full sequence this pass: were the files changed?")
            if not self.loop:
                return
            self._epoch, self._consumed = self._epoch + 1, 0

    def batches(self, batch_size: int, *, drop_last: bool = True, limit: int | None = None) -> Iterator[torch.Tensor]:
        """LongTensor [batch_size, seq_len] batches of at most ``limit`` sequences in all.

        Training drops a partial last batch (``drop_last``); evaluation keeps it, so every sequence counts.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        batch: list[torch.Tensor] = []
        for seq in itertools.islice(self, limit):
            batch.append(seq)
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
        if batch and not drop_last:
            yield torch.stack(batch)

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch, sequences this rank has had in it, plus the data's fingerprint and world size."""
        state = {"epoch": self._epoch, "consumed": self._consumed, "world_size": self.world_size}
        return {**state, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position (the epoch is regenerated up to it). Refuses other data or world size."""
        if "fingerprint" in state and state["fingerprint"] != self.fingerprint():
            raise ModifyError(
                "the data, --seq-len, seed or split differ from the run being resumed: "
                "resume with the same data and settings, or start a new run"
            )
        if state.get("world_size", self.world_size) != self.world_size:
            raise ModifyError(
                f"the run being resumed used {state['world_size']} processes, this one {self.world_size}: "
                "resume with the same number of processes"
            )
        self._epoch, self._consumed = int(state["epoch"]), int(state["consumed"])
        self._loaded = True

    def fingerprint(self) -> str:
        """sha256 over the files (path, size, mtime), seq_len, seed, split and eval_fraction."""
        h = hashlib.sha256()
        for path in self.files:
            try:
                st = path.stat()
            except OSError as exc:
                raise ModifyError(f"cannot read data file {path} ({exc.strerror}): restore it") from None
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        h.update(f"{self.seq_len}:{self.seed}:{self.split}:{self.eval_fraction!r}".encode())
        return h.hexdigest()

    def count_tokens(self) -> int:
        """Tokens this rank gets in one pass of the split (full sequences only); reads the whole split once."""
        if self._count is None:
            if self.by_windows:
                count = sum(held == (self.split == "eval") for held in self._held_out_flags())
            else:
                count = sum(len(ids) for ids in self._token_lists(self.files)) // self.seq_len
            self._count = count // self.world_size * self.seq_len
        return self._count
