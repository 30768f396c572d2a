"""The data pipeline of ``modify train``: files, documents, held-out split, packing, order, sharding, resume."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from modify.errors import ModifyError
from modify.testing import tiny_tokenizer
from modify.train.data import (
    Document,
    PackedStream,
    collect_files,
    held_out_window,
    in_eval_split,
    iter_documents,
)


@pytest.fixture(scope="module")
def tok() -> Any:
    """The character tokenizer with an eos token of its own (id 97, which no character maps to)."""
    t = tiny_tokenizer()
    t.add_special_tokens({"eos_token": "<eos>"})
    return t


def ids(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def write_corpus(root: Path, n: int = 12) -> list[Path]:
    """n plain-text documents of different lengths, and one jsonl file of n more."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i:02d}.txt").write_text(f"document {i} " + "abcdefgh"[: i % 8] * (i + 3))
    lines = [json.dumps({"text": f"line {i}: " + "xyz" * i, "meta": i}) for i in range(n)]
    (root / "more.jsonl").write_text("\n".join(lines) + "\n")
    return collect_files([root])


def take(stream: Any, n: int) -> list[list[int]]:
    return [s.tolist() for s in itertools.islice(stream, n)]


def test_collect_files_searches_directories_and_skips_hidden(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ["b.txt", "sub/a.md", "sub/c.jsonl", "d.text", ".e.txt", ".hidden/f.txt", "g.py"]:
        (tmp_path / name).write_text("x")
    other = tmp_path / "notes.csv"
    other.write_text("y")
    files = collect_files([tmp_path, other, tmp_path / "b.txt"])
    names = [p.relative_to(tmp_path).as_posix() for p in files]
    assert names == sorted(["b.txt", "d.text", "notes.csv", "sub/a.md", "sub/c.jsonl"])
    assert files == sorted(files) and all(p.is_absolute() for p in files)


def test_iter_documents_text_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("whole file\nis one document\n")
    (tmp_path / "b.jsonl").write_text('{"text": "first"}\n\n{"text": "third", "x": 1}\n')
    docs = list(iter_documents(collect_files([tmp_path])))
    a, b = str((tmp_path / "a.txt").resolve()), str((tmp_path / "b.jsonl").resolve())
    assert docs == [
        Document(a, "whole file\nis one document\n"),
        Document(f"{b}:1", "first"),
        Document(f"{b}:3", "third"),
    ]


@pytest.mark.parametrize("line", ['{"text": "ok"', '{"txt": "no text field"}', '{"text": 3}', '["text"]'])
def test_bad_jsonl_line_names_file_and_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ModifyError) as err:
        list(iter_documents([path]))
    message = str(err.value)
    assert f"{path.resolve()}:2:" in message and '"text"' in message and "\n" not in message


def test_packing_is_exact_with_eos_at_every_boundary(tmp_path: Path, tok: Any) -> None:
    files = write_corpus(tmp_path)
    seq_len = 16
    stream = PackedStream(files, tok, seq_len, loop=False, shuffle=False)
    seqs = [s for s in stream]
    assert all(s.dtype == torch.long and s.shape == (seq_len,) for s in seqs)
    expected: list[int] = []
    for doc in iter_documents(files):
        expected += ids(tok, doc.text) + [tok.eos_token_id]
    assert len(seqs) == len(expected) // seq_len  # only the final partial sequence is dropped
    flat = torch.cat(seqs).tolist()
    assert flat == expected[: len(flat)]
    eos_at = [i for i, t in enumerate(flat) if t == tok.eos_token_id]
    boundaries, pos = [], 0
    for doc in iter_documents(files):
        pos += len(ids(tok, doc.text)) + 1
        if pos <= len(flat):
            boundaries.append(pos - 1)
    assert eos_at == boundaries and len(boundaries) > 10
    # batches: [B, T], the partial last batch dropped
    batches = list(stream.batches(3))
    assert len(batches) == len(seqs) // 3 and all(b.shape == (3, seq_len) for b in batches)
    assert torch.equal(torch.cat(batches).flatten(), torch.cat(seqs[: 3 * len(batches)]))
    assert stream.count_tokens() == len(seqs) * seq_len


def test_same_seed_same_order_other_seed_other_order(tmp_path: Path, tok: Any) -> None:
    files = write_corpus(tmp_path)
    a = take(PackedStream(files, tok, 8, seed=1, shuffle_buffer=8), 60)
    b = take(PackedStream(files, tok, 8, seed=1, shuffle_buffer=8), 60)
    c = take(PackedStream(files, tok, 8, seed=2, shuffle_buffer=8), 60)
    assert a == b and a != c
    plain = take(PackedStream(files, tok, 8, shuffle=False), 60)
    assert a != plain
    # one pass is epoch 0 of the looping stream; epoch 1 has another order; epochs go on forever
    one = [s.tolist() for s in PackedStream(files, tok, 8, seed=1, shuffle_buffer=8, loop=False)]
    n = len(one)
    three = take(PackedStream(files, tok, 8, seed=1, shuffle_buffer=8), 3 * n)
    assert len(three) == 3 * n and three[:n] == one and three[n : 2 * n] != one != three[2 * n :]


class RecordingTokenizer:
    """Delegates to the tiny tokenizer and records the longest text it was given in one call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.eos_token_id = inner.eos_token_id
        self.longest = 0
        self.calls = 0

    def __call__(self, texts: str | list[str], **kwargs: Any) -> Any:
        batch = [texts] if isinstance(texts, str) else texts
        self.longest = max(self.longest, sum(len(t) for t in batch))
        self.calls += 1
        return self.inner(texts, **kwargs)


def test_a_large_file_is_tokenised_in_pieces(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "big.txt"
    line = "the quick brown fox jumps over the lazy dog 0123456789\n"
    with open(path, "w") as f:
        for _ in range(5_000_000 // len(line) + 1):
            f.write(line)
    size = path.stat().st_size
    assert size >= 5_000_000
    recorder = RecordingTokenizer(tok)
    stream = PackedStream([path], recorder, 64, shuffle_buffer=4)
    first = take(stream, 3)
    assert recorder.longest < size / 2 and recorder.calls >= 1
    assert first == take(PackedStream([path], recorder, 64, shuffle_buffer=4), 3)
    # pieces end at line ends: the text of the whole file is still one document
    assert [d.text[:20] for d in iter_documents([path])] == [line[:20]]


def test_held_out_split_is_disjoint_complete_and_stable(tmp_path: Path, tok: Any) -> None:
    files = write_corpus(tmp_path, n=20)
    all_ids = [d.id for d in iter_documents(files)]
    train = {d for d in all_ids if not in_eval_split(d, 0.3)}
    held = {d for d in all_ids if in_eval_split(d, 0.3)}
    assert train and held and not train & held and train | held == set(all_ids)
    assert held == {d for d in all_ids if in_eval_split(d, 0.3)}  # deterministic
    assert not any(in_eval_split(d, 0.0) for d in all_ids) and all(in_eval_split(d, 1.0) for d in all_ids)

    def tokens(split: str) -> list[int]:
        s = PackedStream(files, tok, 4, split=split, eval_fraction=0.3, loop=False, shuffle=False)
        return torch.cat(list(s)).tolist()

    def expected(keep: set[str]) -> list[int]:
        out: list[int] = []
        for d in iter_documents(files):
            if d.id in keep:
                out += ids(tok, d.text) + [tok.eos_token_id]
        return out

    for split, keep in [("train", train), ("eval", held)]:
        got = tokens(split)
        assert got == expected(keep)[: len(got)] and got == tokens(split)
    assert len(tokens("all")) > len(tokens("train")) > 0


def test_held_out_windows_are_evenly_spread_and_at_least_one() -> None:
    for fraction in (0.05, 0.25, 0.3):
        for n in (1, 2, 7, 20, 101):
            held = [i for i in range(n) if held_out_window(i, fraction)]
            assert held[0] == 0 and len(held) == math.ceil(n * fraction)
    assert [i for i in range(12) if held_out_window(i, 0.25)] == [0, 4, 8]


def test_one_document_falls_back_to_disjoint_token_windows(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "play.txt"
    path.write_text(" ".join(f"{i:04d}" for i in range(400)) + "\n")  # every 8-token window is distinct
    files = collect_files([path])
    all_windows = [s.tolist() for s in PackedStream(files, tok, 8, loop=False, shuffle=False)]
    streams = {
        "train": PackedStream(files, tok, 8, split="train", eval_fraction=0.05, seed=3),
        "eval": PackedStream(files, tok, 8, split="eval", eval_fraction=0.05, loop=False, shuffle=False),
    }
    assert all(s.by_windows for s in streams.values())
    held = [w for i, w in enumerate(all_windows) if held_out_window(i, 0.05)]
    train = [s.tolist() for s in itertools.islice(streams["train"], 3 * len(all_windows))]  # three epochs
    evals = [s.tolist() for s in streams["eval"]]
    assert evals == held and len(held) == math.ceil(len(all_windows) * 0.05)
    assert {tuple(w) for w in train} == {tuple(w) for w in all_windows if w not in held}  # the rest, every epoch
    assert streams["eval"].count_tokens() == 8 * len(held)
    assert streams["train"].count_tokens() == 8 * (len(all_windows) - len(held))
    note = streams["eval"].held_out_note()
    assert note is not None and "\n" not in note
    assert f"{len(held)} of {len(all_windows)} token windows held out ({8 * len(held)} tokens)" in note
    assert "because the data has 1 document, too few" in note
    # enough documents: still split by document, no note
    corpus = write_corpus(tmp_path / "corpus", n=20)
    by_docs = PackedStream(corpus, tok, 4, split="eval", eval_fraction=0.3)
    assert not by_docs.by_windows and by_docs.held_out_note() is None


def test_a_text_too_short_for_a_window_each_way_is_one_line(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "short.txt"
    path.write_text("abcdefghijklmno")  # 16 tokens with the eos: two windows of 8
    PackedStream([path], tok, 8, split="eval", eval_fraction=0.05)  # one each way is enough
    message = one_line_error(PackedStream, [path], tok, 9, split="train", eval_fraction=0.05)
    assert "(1 document, too few to split by document) makes 1 windows of --seq-len 9" in message
    assert "shorter --seq-len" in message
    message = one_line_error(PackedStream, [path], tok, 8, split="eval", eval_fraction=0.05, world_size=2)
    assert "x 2 ranks" in message


def test_ranks_are_disjoint_and_interleave_to_the_single_process_order(tmp_path: Path, tok: Any) -> None:
    files = write_corpus(tmp_path)
    kw = dict(seed=3, shuffle_buffer=8, loop=False)
    single = [s.tolist() for s in PackedStream(files, tok, 8, **kw)]
    r0 = [s.tolist() for s in PackedStream(files, tok, 8, rank=0, world_size=2, **kw)]
    r1 = [s.tolist() for s in PackedStream(files, tok, 8, rank=1, world_size=2, **kw)]
    assert len(r0) == len(r1) == len(single) // 2
    assert [s for pair in zip(r0, r1) for s in pair] == single[: 2 * len(r0)]
    assert r0 != r1 and r0 == single[0 : 2 * len(r0) : 2]


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_continues_exactly(tmp_path: Path, tok: Any, world_size: int) -> None:
    files = write_corpus(tmp_path)
    kw = dict(seed=5, shuffle_buffer=8, world_size=world_size, rank=world_size - 1)
    reference = [b.tolist() for b in itertools.islice(PackedStream(files, tok, 8, **kw).batches(4), 40)]
    for n in (3, 30):  # inside the first epoch, and past its end
        stream = PackedStream(files, tok, 8, **kw)
        first = [b.tolist() for b in itertools.islice(stream.batches(4), n)]
        state = stream.state_dict()
        fresh = PackedStream(files, tok, 8, **kw)
        fresh.load_state_dict(state)
        rest = [b.tolist() for b in itertools.islice(fresh.batches(4), 40 - n)]
        assert first + rest == reference
    assert state["epoch"] >= 1
    other = PackedStream(files, tok, 8, seed=6, shuffle_buffer=8, world_size=world_size, rank=world_size - 1)
    with pytest.raises(ModifyError):
        other.load_state_dict(state)


def test_eval_stream_starts_each_pass_from_the_start(tmp_path: Path, tok: Any) -> None:
    files = write_corpus(tmp_path)
    stream = PackedStream(files, tok, 8, loop=False)
    first = take(stream, 2)
    assert take(stream, 2) == first and len(list(stream)) > 2


def test_fingerprint_follows_data_and_settings(tmp_path: Path, tok: Any) -> None:
    files = write_corpus(tmp_path)
    base = PackedStream(files, tok, 8).fingerprint()
    assert base == PackedStream(files, tok, 8).fingerprint()
    assert base != PackedStream(files, tok, 16).fingerprint()
    assert base != PackedStream(files, tok, 8, split="train", eval_fraction=0.2).fingerprint()
    files[0].write_text(files[0].read_text() + " more")
    assert base != PackedStream(files, tok, 8).fingerprint()


def one_line_error(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ModifyError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert message and "\n" not in message
    return message


def test_errors(tmp_path: Path, tok: Any) -> None:
    assert "does not exist" in one_line_error(collect_files, [tmp_path / "missing"])
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "notes.py").write_text("x")
    assert "no text files" in one_line_error(collect_files, [tmp_path / "empty_dir"])
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "blank" / "b.jsonl").write_text("")
    assert "empty" in one_line_error(collect_files, [tmp_path / "blank"])

    files = write_corpus(tmp_path / "corpus")
    assert "eos" in one_line_error(PackedStream, files, tiny_tokenizer(), 8)
    PackedStream(files, tiny_tokenizer(), 8, eos_id=96)  # an explicit eos id will do

    total = sum(len(ids(tok, d.text)) + 1 for d in iter_documents(files))
    message = one_line_error(PackedStream, files, tok, total + 1)
    assert f"has {total} tokens, fewer than --seq-len {total + 1}" in message and "shorter --seq-len" in message
    PackedStream(files, tok, total)  # exactly one sequence is enough
    assert "x 2 ranks" in one_line_error(PackedStream, files, tok, total // 2 + 1, world_size=2)
    assert "no documents" in one_line_error(PackedStream, files, tok, 8, split="eval", eval_fraction=0.0)
    assert "no documents" in one_line_error(PackedStream, files, tok, 8, split="train", eval_fraction=1.0)
