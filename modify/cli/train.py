"""``modify train MODEL --data PATHS --out DIR``: continued pretraining of a converted model (or, with
``--dense``, of the baseline), on one process or under ``torchrun`` with FSDP2 or DDP."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from modify.cli.common import add_common_flags, emit_json, quiet_libraries
from modify.errors import ModifyError, UsageError
from modify.io.checkpoint import (
    check_parent,
    is_converted_directory,
    load_tokenizer,
    resolve_source,
    validate_source,
)
from modify.train import config as cfg
from modify.train.config import TrainConfig, load_config_file
from modify.train.data import PackedStream, collect_files

EXAMPLES = """examples:
  modify train out/smollm2-mod --data plays/ --tokens 500000 --out runs/mod
  modify train smollm2 --dense --data plays/ --tokens 500000 --out runs/dense          # the baseline
  modify train out/smollm2-mod --data corpus.jsonl --steps 2000 --train lora --lr 2e-4 --out runs/lora
  modify train out/smollm2-mod --config train.yaml --lr 3e-5                          # flags override the file
  modify train out/smollm2-mod --config runs/mod/train_config.yaml --resume            # continue after a kill
  modify train out/smollm2-mod --data plays/ --steps 200 --autocast none --out runs/fp32  # float32 compute, no autocast
  torchrun --nproc_per_node 4 -m modify train out/smollm2-mod --data plays/ --steps 1000 --out runs/fsdp
  modify train out/smollm2-mod --data plays/ --tokens 262144 --distill --out runs/kd     # KL to the original
  modify train out/smollm2-mod --data plays/ --steps 100 --distill --distill-weight 0.5 --distill-temperature 2 \
      --distill-hidden 0.1 --train lora --out runs/kd-lora        # the teacher: the student with routing off
  modify train pruned/ --dense --data plays/ --steps 100 --distill --teacher smollm2 --out runs/kd-pruned

DIR receives: the trained model (loadable with modify.from_pretrained; LoRA merged, adapters in DIR/adapter),
train_config.yaml (the resolved settings), metrics.csv (and DIR/tensorboard where installed), report.png,
train.log, and checkpoints/step-N/ every --save-every steps. --resume alone continues from DIR's latest
checkpoint; --resume CKPT from that one. Data: text files, directories of them, JSON-lines with a "text" field.
--dtype is the weights' dtype (float32; bfloat16 halves weights and optimizer state), as in every subcommand;
--autocast the compute dtype (auto: bfloat16 where the hardware has it). --distill trains on
(1 - W) * LM + W * tau^2 * KL(teacher || student) per token (W --distill-weight, default 1; tau
--distill-temperature); the teacher is the conversion's source: the student with routing (and LoRA) off for
--train routers/routers+norms/routers+skip/lora, a frozen copy for --train full, or --teacher SRC (needed when
MODEL is the output of a run whose --train moved base weights)."""

_TYPES = {"steps": int, "tokens": int, "seq_len": int, "batch_size": int, "grad_accum": int, "lr": float,
          "router_lr": float, "warmup": int, "weight_decay": float, "clip": float, "capacity_anneal": int,
          "router_phase": int, "aux_weight": float, "lora_rank": int, "lora_alpha": float, "eval_fraction": float,
          "eval_every": int, "eval_tokens": int, "save_every": int, "seed": int, "max_bad_steps": int, "log_every": int,
          "distill_weight": float, "distill_temperature": float, "distill_hidden": float}  # fmt: skip
# --dtype is the weights' dtype, as in every subcommand; the compute dtype is --autocast.
_CHOICES = {"train": "TRAIN_MODES", "schedule": "SCHEDULES", "strategy": "STRATEGIES", "dtype": "DTYPES",
            "autocast": "AUTOCASTS"}  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="continued pretraining of a converted model (or the dense baseline)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # unset flags leave the config file's values alone
    )
    helps = {f.name: f.metadata.get("help", "").replace("%", "%%") for f in fields(cfg.TrainConfig)}
    defaults = {f.name: f.default for f in fields(cfg.TrainConfig)}
    p.add_argument("model", metavar="MODEL", nargs="?", help="converted directory (or any source, with --dense)")
    p.add_argument("--data", nargs="+", metavar="PATH", help=helps["data"])
    p.add_argument("--out", metavar="DIR", help=helps["out"])
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML or TOML file of settings; flags override it")
    p.add_argument("--dense", action="store_true", help=helps["dense"])
    p.add_argument("--eval-data", nargs="+", metavar="PATH", help=helps["eval_data"])
    p.add_argument("--distill", action="store_true", help=helps["distill"])
    p.add_argument("--teacher", metavar="SRC", help=helps["teacher"])
    for name, kind in _TYPES.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"{helps[name]} (default {defaults[name]})")
    for name, table in _CHOICES.items():
        choices = getattr(cfg, table)
        p.add_argument(f"--{name}", choices=choices, help=f"{helps[name]} (default {defaults[name]})")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CKPT",
        help="continue a killed run from its latest checkpoint, or from CKPT",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    add_common_flags(p)
    p.set_defaults(run=run, quiet=False, debug=False, json=False)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    settings: dict[str, Any] = load_config_file(args.config) if getattr(args, "config", None) else {}
    flags = {k: v for k, v in vars(args).items() if k in TrainConfig.keys()}
    settings.update(flags)
    if getattr(args, "model", None):
        settings["model"] = args.model
    if not settings.get("model"):
        raise UsageError("give MODEL: a directory written by 'modify convert' (or a source with --dense)")
    if not settings.get("data"):
        raise UsageError("give --data PATH...: text files, directories of them or .jsonl files")
    if not settings.get("out"):
        raise UsageError("give --out DIR: the run directory")
    return TrainConfig(**settings)


def _check_model(config: TrainConfig) -> None:
    source = resolve_source(config.model)
    validate_source(source)
    converted = is_converted_directory(source)
    if config.dense and converted:
        raise UsageError(f"{config.model} is a converted model; --dense trains an unconverted one: give its source")
    if config.teacher:
        validate_source(resolve_source(config.teacher))
    if not config.dense and not converted:
        raise UsageError(
            f"{config.model} is not a converted model; convert it first (modify convert {config.model} OUT) "
            "or pass --dense to train the dense baseline"
        )


def _resume_point(config: TrainConfig, resume: str | None) -> Path | None:
    # import time: the training loop (transformers.Trainer, peft) loads only when the command runs
    from modify.train.checkpoints import latest

    out = Path(config.out)
    if resume is None:
        return None
    if resume == "latest":
        point = latest(out)
        if point is None:
            raise ModifyError(f"--resume: {out} has no complete checkpoint; start without --resume")
        return point
    point = Path(resume)
    if not point.is_dir():
        raise ModifyError(f"--resume {resume} does not exist; give a checkpoints/step-N directory or --resume alone")
    return point


def run(args: argparse.Namespace) -> int:
    # import time: the training loop (transformers.Trainer, peft) loads only when the command runs
    from modify.train.checkpoints import check_resume
    from modify.train.loop import Trainer

    config = resolve_config(args)
    main_process = int(os.environ.get("RANK", "0")) == 0
    quiet_libraries(args.debug, False)
    _check_model(config)
    files = collect_files(config.data)
    if config.eval_data:
        collect_files(config.eval_data)
    out = Path(config.out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ModifyError(f"--out {out} is a file; choose a directory")
    resume = _resume_point(config, getattr(args, "resume", None))
    # Only the main process checks: under torchrun it may already have created OUT when the others look.
    if main_process and resume is None and out.is_dir() and any(out.iterdir()):
        raise ModifyError(f"--out {out} already holds a run; pass --resume to continue it or choose another --out")
    check_parent(out)
    if resume is not None:
        tokenizer = load_tokenizer(resolve_source(config.model))
        stream = PackedStream(files, tokenizer, config.seq_len, seed=config.seed, split=config.train_split,
                              eval_fraction=config.eval_fraction)  # fmt: skip
        check_resume(config, resume, int(os.environ.get("WORLD_SIZE", "1")), stream.fingerprint())
    created = not out.exists()
    log_file: list[Any] = []

    def log(line: str) -> None:
        if not main_process:
            return
        if not args.quiet or "collapse" in line or "non-finite" in line:
            print(line, file=sys.stderr, flush=True)
        if log_file:
            log_file[0].write(line + "\n")
            log_file[0].flush()

    trainer = Trainer(config, resume, log, progress=not args.quiet and not args.json, verbose_load=args.debug)
    try:
        if main_process:
            out.mkdir(parents=True, exist_ok=True)
            config.save(out / "train_config.yaml")
            log_file.append(open(out / "train.log", "a"))
        summary = trainer.run()
    except BaseException:
        if created and main_process and getattr(trainer, "step", 0) == 0:
            if log_file:
                log_file[0].close()
            shutil.rmtree(out, ignore_errors=True)  # failed before the first step: leave nothing behind
        raise
    finally:
        if log_file and not log_file[0].closed:
            log_file[0].close()
    if not main_process:
        return 0
    if args.json:
        emit_json(summary)
    elif not args.quiet:
        ppl = f", held-out perplexity {summary['eval_ppl']:.2f}" if summary["eval_ppl"] is not None else ""
        print(f"wrote {summary['out']}: {summary['steps']} steps, {summary['tokens']:,} tokens{ppl}")
    return 0
