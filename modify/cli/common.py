"""What the subcommands share: one-line errors, argument types, progress on a terminal, JSON output."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

from huggingface_hub.utils import disable_progress_bars
from rich.console import Console
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from modify.errors import HarnessMissingError

__all__ = [
    "Parser",
    "capacity_type",
    "Progress",
    "emit_json",
    "add_common_flags",
    "quiet_libraries",
    "load_harness",
]


class Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line: ``modify convert: error: ...`` and exit code 2.

    ``checks`` run on the namespace after parsing, for rules between flags that argparse can't state (a flag
    that means something only beside another); they report through :meth:`error`, so the same one line.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checks: list[Callable[[Parser, argparse.Namespace], None]] = []

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        for check in self.checks:
            check(self, namespace)
        return namespace, extras

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def capacity_type(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"capacity {text!r} is not a number; use a value in [0, 1] (0 removes the block), e.g. 0.125"
        ) from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(
            f"capacity {text} is out of range; use a value in [0, 1] (0 removes the block), e.g. 0.125"
        )
    return value


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors and the result")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")


def quiet_libraries(debug: bool, show_progress: bool) -> None:
    """Keep transformers' warnings and bars out of the output unless asked for."""
    if not show_progress:
        hf_logging.disable_progress_bar()
        disable_progress_bars()  # transformers 5 writes shards under huggingface_hub's bars
    if not debug:
        hf_logging.set_verbosity_error()
        warnings.filterwarnings("ignore")
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


class Progress:
    """Step messages with a spinner on a terminal; silent in a pipe or with --quiet.

    When silent, whatever libraries print to stderr during a step (transformers' GGUF loader draws its own
    tqdm bar) is swallowed too, unless --debug.
    """

    def __init__(self, quiet: bool, debug: bool = False) -> None:
        self.enabled = not quiet and sys.stderr.isatty()
        self.debug = debug

    @contextlib.contextmanager
    def step(self, message: str) -> Iterator[None]:
        if not self.enabled:
            with contextlib.nullcontext() if self.debug else contextlib.redirect_stderr(io.StringIO()):
                yield
            return
        with Console(stderr=True).status(message):
            yield

    def bar(self) -> _Bar:
        return _Bar(self.enabled)


class _Bar:
    """A tqdm bar per stage on a terminal; a no-op elsewhere. Called as ``bar(stage, done, total)``."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.current: Any = None
        self.stage = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            self.close()
            self.current, self.stage = tqdm(total=total, desc=stage, leave=False), stage
        self.current.update(done - self.current.n)

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


def emit_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def load_harness() -> ModuleType:
    """:mod:`modify.bench.harness`, or a one-line error naming the install when lm-eval is missing or not 0.4.x."""
    try:  # optional dependency: lm-eval, the extra modify[eval]; the harness module imports it at its top
        from modify.bench import harness
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing in ("", "modify"):
            raise
        what = "lm-evaluation-harness is" if missing == "lm_eval" else f"{missing}, which lm-eval needs, is"
        raise HarnessMissingError(f'{what} not installed; install the extra: pip install "modify[eval]"') from None
    if not harness.LM_EVAL_VERSION.startswith("0.4."):
        raise HarnessMissingError(
            f'lm-eval {harness.LM_EVAL_VERSION} is installed; modify needs 0.4.x: pip install "modify[eval]"'
        )
    return harness
