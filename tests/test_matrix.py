"""The support matrix: regenerated from the installed transformers, no supported family may fall out.

docs/support-matrix.md is the committed table (``python -m modify.testing.matrix --write
docs/support-matrix.md``). This test runs every causal-LM family again (about 125 s on 2 cores) and fails
when a family the table lists as supported no longer passes, printing each one's reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from modify.testing.family_checks import COLUMNS
from modify.testing.matrix import EXCLUDED, markdown, run_matrix
from modify.testing.tiny_configs import tiny_config

TABLE = Path(__file__).resolve().parents[1] / "docs" / "support-matrix.md"


def _committed() -> dict[str, str]:
    rows = re.findall(
        r"^\| ([\w.-]+) \| [^|]* \| (supported|unverified|unsupported|excluded) \|", TABLE.read_text(), re.M
    )
    return dict(rows)


def test_committed_table_is_what_the_readme_counts() -> None:
    """The README's count is the table's; a supported family passes every column, the reference at c < 1 and
    cached generate() included."""
    status = _committed()
    counted = [s for s in status.values() if s != "excluded"]
    assert len(status) > 150
    assert {t for t, s in status.items() if s == "excluded"} == set(EXCLUDED) & set(status)
    readme = (TABLE.parents[1] / "README.md").read_text()
    assert f"{counted.count('supported')} of {len(counted)}" in readme
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 3 and cells[2] == "supported":
            assert cells[3 : 3 + len(COLUMNS)] == ["✓"] * len(COLUMNS), line


@pytest.mark.matrix
def test_supported_families_stay_supported() -> None:
    committed = _committed()
    rows = run_matrix()
    now = {r.model_type: r for r in rows}
    lost = {
        t: now[t].reason if t in now else "no longer registered by transformers"
        for t, s in committed.items()
        if s == "supported" and (t not in now or now[t].status != "supported")
    }
    assert not lost, "no longer supported:\n" + "\n".join(f"{t}: {reason}" for t, reason in lost.items())
    assert "decoder families supported" in markdown(rows, "test", 0.0)


def test_tiny_config_keeps_one_layer_of_each_kind() -> None:
    """A hybrid's tiny config keeps its rare layer kinds (one full-attention layer in four linear-attention
    ones), and per-layer index lists and settings follow the kept layers."""
    config = tiny_config("qwen3_next")
    assert config.num_hidden_layers == 4 and len(config.layer_types) == 4
    assert {"linear_attention", "full_attention"} <= set(config.layer_types)
    gemma4 = tiny_config("gemma4_text")
    assert set(gemma4.layer_types) == {"sliding_attention", "full_attention"}
    assert config.hidden_size == 64 and config.vocab_size == 256
