"""Helpers for tests and examples: tiny random models of each supported family, built without downloads, and
the support matrix over every causal-LM family transformers registers (:mod:`modify.testing.matrix`).

May import: :mod:`modify.train`, :mod:`modify.calibrate`, :mod:`modify.generate` and every layer below them.
"""

from __future__ import annotations

from modify.testing.tiny_models import FAMILIES, tiny_model, tiny_tokenizer

__all__ = ["FAMILIES", "tiny_model", "tiny_tokenizer"]
