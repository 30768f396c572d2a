"""The offline tasks' datasets, read from the JSON lines beside this file.

lm-eval calls these through ``custom_dataset: !function data.NAME`` in the tasks' YAML, loading this file by its
path: the data is found beside it from any working directory, under ``modify eval --tasks`` or plain
``lm_eval --include_path``, and nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

__all__ = ["shakespeare_next_line", "shakespeare_bpb", "pydoc_ending"]


def _load(name: str) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (Path(__file__).parent / f"{name}.jsonl").read_text("utf-8").splitlines()]
    splits = dict.fromkeys(r["split"] for r in rows)
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list([r for r in rows if r["split"] == split]) for split in splits}
    )


def shakespeare_next_line(**metadata: Any) -> datasets.DatasetDict:
    return _load("shakespeare_next_line")


def shakespeare_bpb(**metadata: Any) -> datasets.DatasetDict:
    return _load("shakespeare_bpb")


def pydoc_ending(**metadata: Any) -> datasets.DatasetDict:
    return _load("pydoc_ending")
