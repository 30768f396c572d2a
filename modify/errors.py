"""Errors raised by :mod:`modify`; each message names the problem and what to do about it."""

from __future__ import annotations

__all__ = ["UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The model has no stack of residual blocks that Mixture-of-Depths can route.

    Args:
        module: qualified name of the module the problem was found in ("" for the model itself).
        reason: why it can't be routed and, where there is one, what to do instead.
    """

    def __init__(self, module: str, reason: str) -> None:
        self.module = module
        self.reason = reason
        where = f"module '{module}'" if module else "the model"
        super().__init__(f"cannot route {where}: {reason}")
