"""Build the offline multiple-choice tasks' JSON lines from text the project already has.

    python -m modify.bench.tasks.build            # rewrites the .jsonl files beside this module

- ``modify_shakespeare_next_line``: a few lines of a play, then four candidate next lines: the true one and
  three lines of the same play of similar length. Plays that no example or test calibrates or trains on
  (:data:`TEST_PLAYS`); the few-shot split comes from another one (:data:`FEWSHOT_PLAY`).
- ``modify_shakespeare_bpb``: passages of the same plays, scored whole (``loglikelihood_rolling``, as lm-eval's
  wikitext): bits per byte, a continuous score that moves with any change to the model.
- ``modify_pydoc_ending``: a sentence of Python's reference documentation (``pydoc_data``, in the standard
  library) cut about half way, then four candidate endings: its own and the endings of three sentences of
  similar length from other topics.

Both are built with a fixed seed, so the shipped files are what this module writes. ``pydoc_data`` follows the
Python it ships with: the shipped file was built with Python 3.11, and another Python may write another one.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modify.bench.tasks import TASKS_DIR
from modify.io.assets import shakespeare_texts

__all__ = ["shakespeare_items", "shakespeare_passages", "pydoc_items", "write_all", "TEST_PLAYS", "FEWSHOT_PLAY"]

#: Held out from everything the project calibrates or trains on (examples/quality_smollm2.py trains on six
#: tragedies and evaluates perplexity on Twelfth Night).
TEST_PLAYS = ("much_ado_about_nothing", "merchant_of_venice", "midsummer_nights_dream", "julius_caesar", "winters_tale")
FEWSHOT_PLAY = "as_you_like_it"
SEED = 31
TEST_ITEMS, FEWSHOT_ITEMS, PASSAGES = 200, 8, 40
PASSAGE_CHARS = 1500
CONTEXT_LINES = 6

_HEADER = re.compile(r"[A-Z][A-Z0-9 .,'&-]*\.")  # "FIRST CITIZEN." names the speaker of what follows
_TITLE = re.compile(r"(ACT|SCENE) ([IVX]+|\d+)\b.*|THE END")


def _play_lines(text: str) -> list[tuple[str, bool]]:
    """The play's non-blank lines after its cast list, each with whether it is a line of speech.

    Stage directions (bracketed, possibly over several lines), act and scene titles and speaker names are kept
    in the context (they are part of the text) but are never an answer or a distractor.
    """
    first = re.search(r"^(ACT|SCENE) ([IVX]+|\d+)\b", text, re.M)  # the cast list ends where the play starts
    lines, bracket = [], False
    for raw in text[first.start() if first else 0 :].splitlines():
        line = " ".join(raw.split())
        if not line:
            continue
        opens, closes = "[" in line, "]" in line
        spoken = not (bracket or opens or closes or _HEADER.fullmatch(line) or _TITLE.fullmatch(line))
        bracket = (bracket or opens) and not closes
        lines.append((line, spoken))
    return lines


def _candidates(lines: list[tuple[str, bool]]) -> list[int]:
    """Lines that can be an answer: spoken, 25 to 75 characters, continuing a speech (the line before is
    spoken too, so the context says something about what comes next)."""
    return [
        i for i in range(CONTEXT_LINES, len(lines)) if lines[i][1] and lines[i - 1][1] and 25 <= len(lines[i][0]) <= 75
    ]


def _distractors(rng: random.Random, answer: str, pool: Sequence[str]) -> list[str]:
    """Three distinct strings of ``pool`` within 40% of ``answer``'s length."""
    near = [s for s in pool if s != answer and abs(len(s) - len(answer)) <= 0.4 * len(answer)]
    picked: list[str] = []
    while len(picked) < 3:
        s = rng.choice(near)
        if s not in picked:
            picked.append(s)
    return picked


def _item(rng: random.Random, context: str, answer: str, distractors: list[str], source: str) -> dict[str, Any]:
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "label": choices.index(answer), "source": source}


def shakespeare_items(plays: Sequence[str], count: int, seed: int = SEED) -> list[dict[str, Any]]:
    """``count`` next-line questions spread evenly over ``plays`` (names as in the shakespeare package)."""
    files = {p.name.removesuffix("_gut.txt"): p for p in shakespeare_texts() if p.name.endswith("_gut.txt")}
    rng = random.Random(seed)
    items: list[dict[str, Any]] = []
    for n, play in enumerate(plays):
        lines = _play_lines(files[play].read_text(encoding="utf-8", errors="replace"))
        candidates = _candidates(lines)
        spoken = [lines[i][0] for i in candidates]
        share = count // len(plays) + (n < count % len(plays))
        for i in sorted(rng.sample(candidates, share)):
            nearby = {lines[j][0] for j in range(max(0, i - 20), min(len(lines), i + 20))}
            context = "\n".join(line for line, _ in lines[i - CONTEXT_LINES : i])
            answer = lines[i][0]
            wrong = _distractors(rng, answer, [s for s in spoken if s not in nearby])
            items.append(_item(rng, context, answer, wrong, f"{play}:{i}"))
    return items


def shakespeare_passages(plays: Sequence[str], count: int, seed: int = SEED) -> list[dict[str, Any]]:
    """``count`` passages of whole lines, about :data:`PASSAGE_CHARS` characters each, spread over ``plays``."""
    files = {p.name.removesuffix("_gut.txt"): p for p in shakespeare_texts() if p.name.endswith("_gut.txt")}
    rng = random.Random(seed)
    items: list[dict[str, Any]] = []
    for n, play in enumerate(plays):
        lines = [line for line, _ in _play_lines(files[play].read_text(encoding="utf-8", errors="replace"))]
        share = count // len(plays) + (n < count % len(plays))
        # non-overlapping: one start per stretch of the play
        stretch = len(lines) // share
        for k in range(share):
            start = k * stretch + rng.randrange(stretch // 2)
            end = start
            while end < len(lines) and sum(len(x) + 1 for x in lines[start:end]) < PASSAGE_CHARS:
                end += 1
            items.append({"text": "\n".join(lines[start:end]), "source": f"{play}:{start}"})
    return items


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a documentation topic: no code, grammar, tables or underlined titles."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        rows = block.split("\n")
        if any(r.startswith((" ", "\t")) for r in rows) or re.search(r"^[*=\-]{3,}$", block, re.M):
            continue
        # "left-" at a line's end and "hand" on the next are one word, as the docs' wrapping split it
        paragraph = re.sub(r"(?<=\w)- (?=\w)", "-", " ".join(r.strip() for r in rows)).strip()
        if paragraph:
            out.append(paragraph)
    return out


def pydoc_items(count: int, seed: int = SEED, offset: int = 0) -> list[dict[str, Any]]:
    """``count`` sentence-ending questions from ``pydoc_data``; ``offset`` skips as many sampled sentences
    first, so that a few-shot split drawn after the test split shares no sentence with it."""
    from pydoc_data.topics import topics  # import time: the standard library's docs are 1 MB of text

    seen: set[str] = set()
    sentences: list[tuple[str, str, str]] = []  # (topic, the sentence before it in its paragraph, sentence)
    for topic in sorted(topics):
        for paragraph in _paragraphs(topics[topic]):
            previous = ""
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph):
                if 12 <= len(s.split()) <= 36 and s.endswith(".") and s not in seen:
                    seen.add(s)  # topics repeat each other's text; a sentence is asked once
                    sentences.append((topic, previous, s))
                previous = s
    rng = random.Random(seed)
    chosen = rng.sample(range(len(sentences)), offset + count)[offset:]
    endings = {i: _split(sentences[i][2])[1] for i in range(len(sentences))}
    items = []
    for i in chosen:
        topic, previous, sentence = sentences[i]
        start, answer = _split(sentence)
        pool = [e for j, e in endings.items() if sentences[j][0] != topic]
        context = f"{previous} {start}".strip() if len(previous.split()) <= 30 else start
        items.append(_item(rng, context, answer, _distractors(rng, answer, pool), f"pydoc:{topic}"))
    return items


def _split(sentence: str) -> tuple[str, str]:
    """A sentence's first words (a little over half) and the rest."""
    words = sentence.split()
    cut = (len(words) + 1) // 2 + 1
    return " ".join(words[:cut]), " ".join(words[cut:])


def _write(path: Path, splits: dict[str, list[dict[str, Any]]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for split, items in splits.items():
            for item in items:
                f.write(json.dumps({"split": split, **item}, ensure_ascii=False) + "\n")


def write_all(folder: Path = TASKS_DIR) -> list[Path]:
    """Write both tasks' files into ``folder``: the test split, then the few-shot split."""
    shakespeare, pydoc = folder / "shakespeare_next_line.jsonl", folder / "pydoc_ending.jsonl"
    passages = folder / "shakespeare_bpb.jsonl"
    _write(shakespeare, {"test": shakespeare_items(TEST_PLAYS, TEST_ITEMS),
                         "train": shakespeare_items((FEWSHOT_PLAY,), FEWSHOT_ITEMS)})  # fmt: skip
    _write(passages, {"test": shakespeare_passages(TEST_PLAYS, PASSAGES)})
    _write(pydoc, {"test": pydoc_items(TEST_ITEMS), "train": pydoc_items(FEWSHOT_ITEMS, offset=TEST_ITEMS)})
    return [shakespeare, passages, pydoc]


if __name__ == "__main__":
    for path in write_all():
        print(path)
