"""Helpers for tests and examples: tiny random models of each supported family, built without downloads."""

from __future__ import annotations

from modify.testing.tiny_models import FAMILIES, tiny_model, tiny_tokenizer

__all__ = ["FAMILIES", "tiny_model", "tiny_tokenizer"]
