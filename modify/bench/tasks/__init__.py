"""The offline lm-eval tasks ``modify`` ships: YAML, the JSON lines they read, and the module that writes them.

:data:`TASKS_DIR` is on ``modify eval --tasks``'s task path always; give it to plain lm-eval as
``--include_path`` (see docs/eval.md).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TASKS_DIR"]

TASKS_DIR = Path(__file__).parent
