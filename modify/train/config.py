"""The settings of a ``modify train`` run: one versioned dataclass, from flags and a YAML or TOML file.

Precedence: the dataclass defaults, then the config file, then the flags given on the command line. The
resolved settings are saved as ``OUT/train_config.yaml``; the keys of that file are the field names below
(dashes or underscores), so a saved config can be passed back with ``--config``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from modify.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package (a requirement there)
    import tomli as tomllib

__all__ = [
    "TrainConfig",
    "TRAIN_MODES",
    "SCHEDULES",
    "STRATEGIES",
    "DTYPES",
    "AUTOCASTS",
    "load_config_file",
    "RUN_KEYS",
]

TRAIN_MODES = ("full", "lora", "routers", "routers+norms", "routers+skip")
SCHEDULES = ("cosine", "linear", "constant")
STRATEGIES = ("auto", "fsdp", "ddp")
DTYPES = ("float32", "bfloat16")  # of the weights, as --dtype everywhere in the command line
AUTOCASTS = ("auto", "bfloat16", "none")
#: 2: ``dtype`` is the weights' dtype and ``autocast`` the compute dtype; version 1 called the latter ``dtype``.
#: 3: existing paths are written relative to the file's directory, or to the home directory (``~/``) when they
#: share no directory but the root (a run directory carries no local path), and a file of version 3 or later
#: is read that way; older and unversioned files are read relative to the cwd.
_VERSION = 3
#: The settings that hold paths.
PATH_KEYS = ("model", "data", "eval_data", "out", "teacher")

#: Settings that decide which tokens each step sees and what learns: a checkpoint resumes only a run that
#: agrees on all of them (the step count and the schedule's length may change).
RUN_KEYS = (
    "model", "dense", "seq_len", "batch_size", "grad_accum", "seed", "train", "lora_rank", "eval_fraction",
    "distill", "teacher", "distill_weight", "distill_temperature", "distill_hidden",
)  # fmt: skip


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig:
    """Everything a training run needs; validated on construction.

    Args:
        model: a directory written by ``modify convert`` (or, with ``dense``, any source it accepts).
        data: text files, directories of them, JSON-lines files with a "text" field.
        out: the run directory: the trained model, checkpoints, metrics and the report.
        dense: train an unconverted model (the baseline every claim is measured against).
        steps / tokens: length of the run, in optimizer steps or in training tokens (one of them).
        seq_len, batch_size, grad_accum: sequences of ``seq_len`` tokens, ``batch_size`` per process and
            micro-step, ``grad_accum`` micro-steps per optimizer step.
        lr, router_lr: peak learning rates of the model's weights and of the routers.
        warmup: linear warm-up steps; ``schedule`` then decays (cosine, linear) or holds (constant).
        weight_decay: AdamW's decoupled decay for weight matrices (never for norms, biases or routers).
        clip: gradient-norm clipping (0 turns it off).
        capacity_anneal: steps over which every routed block's capacity goes from 1.0 to the plan's.
        router_phase: the first that many steps route with a straight-through gradient for every token's
            router score, Δ computed for every token (a dense step's cost; see ``modify.routing.forward``).
        aux_weight: coefficient of any auxiliary loss the model returns (``outputs.aux_loss``) but does not add
            to ``outputs.loss`` itself (a converted model's causal-routing loss comes added, with ``lm_loss``).
        train: what learns: ``full``, ``lora`` (LoRA on the blocks' linears plus the routers, with peft),
            ``routers``, ``routers+norms`` or ``routers+skip``.
        lora_rank, lora_alpha: LoRA's rank and scale.
        eval_data: held-out text; without it, ``eval_fraction`` of the documents of ``data`` are held out (of
            its token windows, when it has too few documents, as one text file; see :mod:`modify.train.data`).
        eval_every, eval_tokens: evaluate every that many steps (0: only at the end) on at most that many
            tokens.
        save_every: write a checkpoint every that many steps (0: only at the end).
        seed: data order and initialisation of anything new (LoRA).
        dtype: the weights' dtype (and so the optimizer state's): float32, or bfloat16 to halve both.
        autocast: compute dtype under autocast: ``auto`` is bfloat16 where the hardware has it, else none (the
            weights' dtype).
        distill: train on the distillation loss from the original model (see :mod:`modify.train.distill`).
        teacher: the model to distil from (a source ``load_any`` accepts); empty: the conversion's source, i.e.
            the student with routing and adapters off, or (``--train full``) a frozen copy of ``model``.
        distill_weight: W of (1 − W)·LM + W·τ²·KL.
        distill_temperature: τ of the softmaxes compared.
        distill_hidden: weight of the per-routed-block hidden-state loss (0: none).
        strategy: under torchrun, ``fsdp`` (FSDP2, one shard unit per block, routers included) or ``ddp``.
        max_bad_steps: consecutive steps with a non-finite loss or gradient after which the run stops.
        log_every: steps between log lines when not on a terminal.
        version: format version of this file.
    """

    model: str = field(default="", metadata=_help("converted model directory (or a source with --dense)"))
    data: list[str] = field(default_factory=list, metadata=_help("training text: files, directories, .jsonl"))
    out: str = field(default="", metadata=_help("run directory"))
    dense: bool = field(default=False, metadata=_help("train an unconverted model: the baseline"))
    steps: int | None = field(default=None, metadata=_help("optimizer steps"))
    tokens: int | None = field(default=None, metadata=_help("training tokens (instead of --steps)"))
    seq_len: int = field(default=512, metadata=_help("tokens per sequence; eval's and calibrate's default is the same"))
    batch_size: int = field(default=8, metadata=_help("sequences per process and micro-step"))
    grad_accum: int = field(default=1, metadata=_help("micro-steps per optimizer step"))
    lr: float = field(default=1e-4, metadata=_help("peak learning rate"))
    router_lr: float = field(default=1e-3, metadata=_help("peak learning rate of the routers"))
    warmup: int = field(default=-1, metadata=_help("warm-up steps (-1: 10% of the run, at most 100)"))
    schedule: str = field(default="cosine", metadata=_help("cosine, linear or constant after warm-up"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay of weight matrices"))
    clip: float = field(default=1.0, metadata=_help("gradient-norm clipping; 0 turns it off"))
    capacity_anneal: int = field(default=0, metadata=_help("steps to anneal capacity from 1.0 to the plan's"))
    router_phase: int = field(default=0, metadata=_help("steps of straight-through routing (dense cost) first"))
    aux_weight: float = field(default=0.01, metadata=_help("coefficient of the model's auxiliary loss"))
    train: str = field(default="full", metadata=_help("full, lora, routers, routers+norms or routers+skip"))
    lora_rank: int = field(default=16, metadata=_help("LoRA rank"))
    lora_alpha: float = field(default=32.0, metadata=_help("LoRA alpha"))
    eval_data: list[str] = field(default_factory=list, metadata=_help("held-out text"))
    eval_fraction: float = field(
        default=0.05, metadata=_help("share held out without --eval-data: of the documents (of windows if too few)")
    )
    eval_every: int = field(default=0, metadata=_help("steps between evaluations (0: at the end)"))
    eval_tokens: int = field(default=65536, metadata=_help("tokens per evaluation, at most"))
    save_every: int = field(default=0, metadata=_help("steps between checkpoints (0: at the end)"))
    seed: int = field(default=0, metadata=_help("seed of data order and new weights"))
    dtype: str = field(default="float32", metadata=_help("weights dtype (and the optimizer state's)"))
    autocast: str = field(
        default="auto",
        metadata=_help("compute dtype: auto (bfloat16 where the hardware has it, else none), bfloat16, or none "
                       "(no autocast: the weights' dtype)"),
    )  # fmt: skip
    distill: bool = field(
        default=False, metadata=_help("distil from the original model (KL to its next-token distribution)")
    )
    teacher: str = field(default="", metadata=_help("model to distil from (default: the conversion's source)"))
    distill_weight: float = field(default=1.0, metadata=_help("W in (1-W)*LM + W*tau^2*KL"))
    distill_temperature: float = field(default=1.0, metadata=_help("temperature tau of the distillation softmaxes"))
    distill_hidden: float = field(default=0.0, metadata=_help("weight of the per-routed-block hidden-state loss"))
    strategy: str = field(default="auto", metadata=_help("auto, fsdp or ddp under torchrun"))
    max_bad_steps: int = field(default=5, metadata=_help("consecutive non-finite steps before stopping"))
    log_every: int = field(default=10, metadata=_help("steps between log lines in a pipe"))
    version: int = field(default=_VERSION, metadata=_help("format version"))

    def __post_init__(self) -> None:
        if self.version > _VERSION:
            raise UsageError(f"train config version {self.version} is newer than this modify's; upgrade modify")
        self.data = [str(p) for p in self.data]
        self.eval_data = [str(p) for p in self.eval_data]
        if self.steps is not None and self.tokens is not None:
            raise UsageError("give --steps or --tokens, not both")
        if self.steps is None and self.tokens is None:
            raise UsageError("give the length of the run: --steps N or --tokens N")
        for name in ("steps", "tokens", "seq_len", "batch_size", "grad_accum", "lora_rank", "max_bad_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{_flag(name)} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise UsageError(f"--seq-len must be at least 2 (one prediction), got {self.seq_len}")
        for name in ("capacity_anneal", "router_phase", "eval_every", "save_every", "seed", "log_every", "eval_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"{_flag(name)} must be a non-negative integer, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < -1:
            raise UsageError(f"--warmup must be a non-negative integer (or -1 for the default), got {self.warmup!r}")
        for name in ("lr", "router_lr", "weight_decay", "clip", "aux_weight", "lora_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise UsageError(f"{_flag(name)} must be a non-negative number, got {value!r}")
            setattr(self, name, float(value))
        if self.lr == 0 and self.router_lr == 0:
            raise UsageError("--lr and --router-lr are both 0: nothing would learn")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UsageError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction!r}")
        choices_of = {"train": TRAIN_MODES, "schedule": SCHEDULES, "strategy": STRATEGIES}
        for name, choices in {**choices_of, "dtype": DTYPES, "autocast": AUTOCASTS}.items():
            if getattr(self, name) not in choices:
                hint = "; the compute dtype is --autocast" if name == "dtype" and self.dtype in AUTOCASTS else ""
                raise UsageError(f"{_flag(name)} {getattr(self, name)!r} is not one of {', '.join(choices)}{hint}")
        self._check_distill()
        if self.dense and self.router_phase:
            raise UsageError("--router-phase trains routers, and a --dense model has none; drop it")
        if self.dense and self.train != "full" and self.train != "lora":
            raise UsageError(f"--train {self.train} trains routers, and a --dense model has none; use full or lora")

    def _check_distill(self) -> None:
        for name in ("distill_weight", "distill_temperature", "distill_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise UsageError(f"{_flag(name)} must be a non-negative number, got {value!r}")
            setattr(self, name, float(value))
        if self.distill_weight > 1:
            raise UsageError(
                f"--distill-weight must be in [0, 1] (the KL's share of the loss), got {self.distill_weight}"
            )
        if self.distill_temperature == 0:
            raise UsageError("--distill-temperature must be positive, e.g. 1.0")
        if not self.distill:
            given = [f for f in ("teacher", "distill_hidden") if getattr(self, f)]
            given += [f for f in ("distill_weight", "distill_temperature") if getattr(self, f) != 1.0]
            if given:
                raise UsageError(f"{_flag(given[0])} needs --distill; add --distill or drop it")
            return
        if self.dense and not self.teacher:
            raise UsageError(
                "--distill with --dense needs --teacher SRC: an unconverted model is its own original; "
                "give the model to distil from"
            )
        if self.dense and self.distill_hidden:
            raise UsageError("--distill-hidden compares routed blocks, and a --dense model has none; drop it")

    @property
    def held_out(self) -> bool:
        """Whether evaluation holds out a share of ``data`` (no ``eval_data`` given)."""
        return self.eval_fraction > 0 and not self.eval_data

    @property
    def train_split(self) -> str:
        """The split of ``data`` that trains: all of it, or what is not held out."""
        return "train" if self.held_out else "all"

    def warmup_steps(self, total: int) -> int:
        return min(100, total // 10) if self.warmup < 0 else self.warmup

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def run_identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the checkpoint's (see ``RUN_KEYS``)."""
        return {key: getattr(self, key) for key in RUN_KEYS}

    def save(self, path: Path) -> None:
        header = (
            "# modify train: the resolved settings of this run; rerun with: modify train --config THIS_FILE\n"
            "# (paths are relative to this file's directory, or to the home directory: ~/)\n"
        )
        settings = self.to_dict()
        for key in PATH_KEYS:
            settings[key] = _map_paths(settings[key], lambda v: _relative(v, path.parent))
        path.write_text(header + yaml.safe_dump(settings, sort_keys=False))

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _map_paths(value: Any, fn: Any) -> Any:
    return (
        [fn(v) for v in value] if isinstance(value, list) else fn(value) if isinstance(value, str) and value else value
    )


def _relative(value: str, base: Path) -> str:
    """``value`` as this file records it: relative to ``base`` when the two share a directory below the root,
    else under the home directory as ``~/...``; a value that names no existing path (a model id, 'smollm2')
    as it is."""
    if not Path(value).exists():
        return value
    target, base = Path(value).resolve(), base.resolve()
    home = Path.home().resolve()
    if os.path.commonpath([target, base]) == os.sep and target.is_relative_to(home):
        return str(Path("~") / target.relative_to(home))
    return os.path.relpath(target, base)


def _from_file(value: str, base: Path) -> str:
    value = str(Path(value).expanduser())
    found = base / value
    return str(found) if not Path(value).is_absolute() and found.exists() else value


def load_config_file(path: Path) -> dict[str, Any]:
    """The settings in a YAML (``.yaml``, ``.yml``) or TOML (``.toml``) file; unknown keys are errors."""
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist; give a YAML or TOML file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text) if path.suffix != ".json" else json.loads(text)
        else:
            raise UsageError(f"config file {path} is neither YAML (.yaml, .yml) nor TOML (.toml); rename or convert it")
    except UsageError:
        raise
    except Exception as exc:  # yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"config file {path} does not parse ({first}); fix its syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of settings, not a {type(data).__name__}")
    if isinstance(data.get("version"), int) and data["version"] >= 3:
        data = {
            k: _map_paths(v, lambda x: _from_file(x, path.parent)) if k in PATH_KEYS else v for k, v in data.items()
        }
    resolved = _upgrade({str(k).replace("-", "_"): v for k, v in data.items()})
    unknown = sorted(set(resolved) - TrainConfig.keys())
    if unknown:
        raise UsageError(
            f"config file {path} has unknown key(s) {', '.join(unknown)}; see 'modify train --help' for the settings"
        )
    for key in ("data", "eval_data"):
        if isinstance(resolved.get(key), str):
            resolved[key] = [resolved[key]]
    return resolved


def _upgrade(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings saved by an older modify, in this version's terms: so a run's own ``train_config.yaml`` still
    resumes it. Only a file that states its version is upgraded; one without is taken as this version's."""
    version = settings.get("version", _VERSION)
    if isinstance(version, int) and version < 2 and "dtype" in settings:
        # Version 1's dtype was the autocast dtype (float32: no autocast); its weights were always float32.
        old = settings.pop("dtype")
        settings["autocast"] = "none" if old == "float32" else old
    if isinstance(version, int) and version < _VERSION:
        settings["version"] = _VERSION
    return settings
