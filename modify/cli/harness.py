"""``modify-lm-eval``: lm-evaluation-harness's own command line, with ``modify`` loaded first.

Plain ``lm_eval`` never imports ``modify``, so it can't load a converted OUT: lm-eval 0.4.13's ``hf`` model
stops with ``ValueError: Unknown quantization type, got modify`` (transformers alone, without lm-eval, would
load the dense model and only warn). This command takes lm-eval's arguments unchanged, after importing
``modify``, which

- registers the model type ``modify`` (:class:`modify.bench.harness.ModifyLM`): ``--model modify --model_args
  pretrained=OUT,routing=topk`` (or ``routing=causal``) loads OUT with its routers and states nothing else;
- lets ``--model hf --model_args pretrained=OUT`` load OUT routed too, through transformers' loading hook (the
  routing is then the model's default: top-k in a forward, causal in ``generate()``);
- puts modify's offline tasks (tag ``modify_offline``) on the task path when no ``--include_path`` is given.

Not a subcommand of ``modify``: every argument belongs to lm-eval, as its ``--help`` lists them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from modify.cli.common import load_harness
from modify.errors import ModifyError

__all__ = ["main", "EXAMPLES"]

EXAMPLES = """examples (lm-eval's own flags):
  modify-lm-eval --model modify --model_args pretrained=out/smollm2-mod --tasks modify_offline
  modify-lm-eval --model modify --model_args pretrained=out/smollm2-mod,routing=causal --tasks hellaswag --batch_size 8
  modify-lm-eval --model hf --model_args pretrained=out/smollm2-mod --tasks arc_easy --device cpu"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["-h"], ["--help"]):
        print(__doc__.split("\n\n")[0] + "\n\n" + EXAMPLES + "\n\nlm-eval's help follows.\n")
    try:
        harness = load_harness()
    except ModifyError as exc:
        print(f"modify-lm-eval: error: {exc}", file=sys.stderr)
        return exc.exit_code
    # optional dependency: lm-eval, installed once load_harness returned
    from lm_eval.__main__ import cli_evaluate

    given = any(a == "--include_path" or a.startswith("--include_path=") for a in args)
    if args and not given and args[0] != "validate" and args not in (["-h"], ["--help"]):
        args += ["--include_path", str(harness.TASKS_DIR)]
    saved = sys.argv
    sys.argv = ["lm_eval", *args]
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse's exit inside lm-eval: its code is the command's
        return int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0
