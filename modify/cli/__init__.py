"""The ``modify`` command line: ``modify convert``, ``inspect``, ``verify``, ``calibrate``, ``train``, ``eval``,
``generate``, ``bench``, ``export``.

Each subcommand lives in its own file and registers itself with :func:`main`'s parser. Errors the user can
fix print one line on stderr (no traceback unless ``--debug``) and exit with 2 for usage errors, 1 for the
rest; an interrupt exits with 130 and leaves nothing written.

The top layer: may import everything. A subcommand imports what only it needs (the training loop, the
benchmarks) inside its ``run``, so that ``modify --help`` stays fast.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from modify import __version__
from modify.cli import bench, calibrate, convert, eval, export, generate, inspect, train, verify
from modify.cli.common import Parser
from modify.errors import ModifyError, UnsupportedModelError

__all__ = ["main"]

_SUBCOMMANDS = (convert, inspect, verify, calibrate, train, eval, generate, bench, export)


def _parser() -> Parser:
    parser = Parser(
        prog="modify",
        description="Retrofit Mixture-of-Depths onto pretrained transformer checkpoints.",
        epilog=(
            "examples:\n  modify convert smollm2 out/smollm2-mod\n  modify inspect out/smollm2-mod\n"
            "  modify verify out/smollm2-mod\n"
            "  modify calibrate smollm2 --data play.txt --flops-budget 0.75 --out plan.json\n"
            "  modify train out/smollm2-mod --data plays/ --tokens 500000 --out runs/mod\n"
            "  modify eval out/smollm2-mod --data heldout.txt\n"
            "  modify eval out/smollm2-mod --tasks modify_offline --baseline smollm2   # lm-eval tasks\n"
            "  modify generate out/smollm2-mod --prompt 'To be, or not to be'\n"
            "  modify bench smollm2-135m --seq-len 1024 --batch-size 4 --plans paper all@0.125\n"
            "  modify export out/removed out/pruned   # a removal-only plan as a plain checkpoint"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"modify {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for module in _SUBCOMMANDS:
        module.register(sub)
    return parser


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so that cleanup in ``finally`` blocks runs on kill (SIGTERM) as on Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"modify {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (ModifyError, UnsupportedModelError) as exc:
        if args.debug:
            raise
        code = getattr(exc, "exit_code", 1)
        print(f"modify {args.command}: error: {exc}", file=sys.stderr)
        return code
    except Exception as exc:  # a bug, not bad input: say so in one line, keep the traceback for --debug
        if args.debug:
            raise
        print(
            f"modify {args.command}: internal error: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''} "
            "(rerun with --debug for the traceback and report it)",
            file=sys.stderr,
        )
        return 1
