"""Errors raised by :mod:`modify`; each message names the problem and what to do about it."""

from __future__ import annotations

__all__ = [
    "UnsupportedModelError",
    "NotResidualError",
    "ModifyError",
    "UsageError",
    "NotRemovalOnlyError",
    "HarnessMissingError",
    "UnknownTaskError",
    "TokenizerMismatchError",
    "NotExportableError",
]


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


class NotResidualError(UnsupportedModelError):
    """The block's input never reaches its output through an addition: as captured, it is not a residual block.

    Capture tries again with the children the block hands its stream traced into (they may add the residual
    inside; see :mod:`modify.passes.capture_delta`).
    """


class ModifyError(Exception):
    """A problem with the user's input or environment; the message is one line naming it and the fix.

    The command line prints it without a traceback and exits with ``exit_code``.
    """

    exit_code = 1


class UsageError(ModifyError):
    """A malformed or out-of-range command-line value (exit code 2, like argparse's own errors)."""

    exit_code = 2


class NotRemovalOnlyError(ModifyError):
    """A plan that does more than remove blocks (capacity 0) was asked to become a plain checkpoint.

    Args:
        blocks: the indices of the blocks that a checkpoint with fewer layers can't express.
        reason: what they do and what to do instead.
    """

    def __init__(self, blocks: list[int], reason: str) -> None:
        self.blocks = blocks
        super().__init__(reason)


class HarnessMissingError(ModifyError):
    """lm-evaluation-harness, the optional extra behind ``modify eval --tasks``, is not installed (or is not 0.4.x)."""


class UnknownTaskError(UsageError):
    """A task name that neither lm-eval nor ``--include-path`` defines.

    Args:
        names: the names not found.
    """

    def __init__(self, names: list[str], reason: str) -> None:
        self.names = names
        super().__init__(reason)


class TokenizerMismatchError(UsageError):
    """Two models compared task by task (``modify eval --baseline``) that read text with different tokenizers,
    so the same request would be scored on different tokens."""


class NotExportableError(ModifyError, ValueError):
    """Blocks can't be deleted into a plain checkpoint that reloads as the same model: every block would go, the
    config decides a kept layer's kind from its index in a way that can't be renumbered, or what was written
    reloads otherwise. A ``ValueError`` too, as :func:`modify.remove_blocks` raised for bad input before.
    """
