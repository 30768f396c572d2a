"""lm-evaluation-harness on a model that ``modify`` loaded: ``modify eval --tasks`` and lm-eval's ``modify`` model.

lm-eval (0.4.x, the optional extra ``modify[eval]``) scores a converted model through its own ``HFLM`` wrapped
around the model object: :class:`ModifyLM` is that wrapper, registered with lm-eval as the model type
``modify``. What it adds to ``HFLM``:

- **How log-likelihoods route.** ``topk`` (the default, the training rule): each routed block keeps the top
  ``capacity`` share of the tokens of the whole request, context and continuation together, so a request is
  scored in a forward of its own: in a padded batch the padding would change how many tokens each row keeps.
  ``causal``: each token decides from its own score, as inside ``generate()``; rows are independent, so
  requests are batched.
- **Generation** (``generate_until`` tasks) goes through ``model.generate()``, which routes causally.
- **Loading.** ``pretrained=OUT`` loads through ``modify`` (a converted directory keeps its routers; a plain
  source loads dense), so the command line ``modify-lm-eval --model modify --model_args pretrained=OUT``
  scores the routed model. Plain ``lm_eval`` never imports ``modify``: see docs/eval.md for what it does.

:data:`TASKS_DIR` holds the offline tasks (``modify_offline``: the next line of a play, the ending of a
sentence of Python's docs), always on the task path.

This module imports lm-eval at import time: the command line imports it only when ``--tasks`` asks for it, and
turns a missing lm-eval into a one-line error (:func:`modify.cli.common.load_harness`).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lm_eval
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from modify.api import routed_blocks
from modify.bench.tasks import TASKS_DIR
from modify.errors import ModifyError, TokenizerMismatchError, UnknownTaskError, UsageError
from modify.io.checkpoint import load_any
from modify.modes import routing_mode

__all__ = [
    "LM_EVAL_VERSION",
    "TASKS_DIR",
    "OFFLINE_TASKS",
    "ModifyLM",
    "Score",
    "task_manager",
    "check_same_tokenizer",
    "run_tasks",
    "routing_note",
]

LM_EVAL_VERSION: str = lm_eval.__version__
#: The tag of the tasks shipped in :data:`TASKS_DIR`.
OFFLINE_TASKS = "modify_offline"


def routing_note(routing: str, routed: bool) -> str:
    """How the model was scored, in the words the output states it with."""
    if not routed:
        return "no routed blocks: scored as the dense model it is"
    if routing == "topk":
        return (
            "log-likelihoods routed top-k over each request's whole context and continuation, one request per "
            "forward; generation routes causally (generate())"
        )
    return "log-likelihoods and generation routed causally, each token deciding alone as in generate()"


@register_model("modify")
class ModifyLM(HFLM):
    """lm-eval's ``HFLM`` over a model loaded by ``modify``, with the routing of log-likelihoods chosen.

    Args:
        pretrained: a model object (converted or not), or what ``modify eval`` accepts as MODEL: a converted
            OUT, a model directory, a .gguf file, a cached model id or "smollm2".
        routing: "topk" or "causal" (see the module's doc); ignored by a model without routed blocks.
        dtype: the weights' dtype when ``pretrained`` is loaded here ("float32", "bfloat16"; default the
            checkpoint's).
        tokenizer: defaults to the one saved with ``pretrained``.
        device: where to move a model loaded here (default: where it loads, the CPU).
        **kwargs: the rest of ``HFLM``'s arguments (``batch_size``, ``max_length``, ...).
    """

    def __init__(
        self,
        pretrained: str | torch.nn.Module,
        routing: str = "topk",
        dtype: str | None = None,
        tokenizer: Any = None,
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        if routing not in ("topk", "causal"):
            raise UsageError(f"routing={routing} is not a routing for log-likelihoods; use topk or causal")
        if isinstance(pretrained, str):
            model, saved, source, _ = load_any(pretrained, None if dtype in (None, "auto") else str(dtype))
            if tokenizer is None and saved is None:
                raise ModifyError(f"{source.path} has no tokenizer; save one beside it or pass tokenizer=...")
            tokenizer = tokenizer if tokenizer is not None else saved
            pretrained = model.to(device) if device else model
        kwargs.pop("backend", None)  # a causal LM, whatever its config says
        with _quiet_lm_eval():  # its warning that arguments are ignored for a model object: none are given
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, backend="causal", **kwargs)
        self.routing = routing
        self.routed = bool(routed_blocks(self.model))
        self._one_request_per_forward = False

    @property
    def batch_size(self) -> Any:
        return 1 if self._one_request_per_forward else super().batch_size

    @contextlib.contextmanager
    def _scoring(self) -> Iterator[None]:
        if not self.routed:
            yield
            return
        self._one_request_per_forward = self.routing == "topk"
        try:
            with routing_mode(self.model, self.routing):
                yield
        finally:
            self._one_request_per_forward = False

    def _loglikelihood_tokens(self, requests: Any, disable_tqdm: bool = False, override_bs: int | None = None) -> Any:
        with self._scoring():
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def task_manager(names: Sequence[str], include_path: Sequence[Path] = ()) -> tuple[TaskManager, list[str]]:
    """A task manager that knows ``names``, and ``names`` once each.

    The offline tasks of :data:`TASKS_DIR` and those under ``include_path`` are indexed first; lm-eval's own
    (thousands of YAML files, seconds to index) only when a name is not among them. Raises
    :class:`UnknownTaskError` naming the closest known names.
    """
    for path in include_path:
        if not path.is_dir():
            raise UsageError(f"--include-path {path} is not a directory; give the folder that holds the task's YAML")
    paths = [str(p) for p in dict.fromkeys([TASKS_DIR.resolve(), *(p.resolve() for p in include_path)])]
    names = list(dict.fromkeys(names))
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not _unknown(manager, names):
        return manager, names
    manager = TaskManager(include_path=paths)
    unknown = _unknown(manager, names)
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownTaskError(
            unknown,
            f"unknown task {unknown[0]!r}{hint}; list them with 'lm_eval ls tasks', run the offline ones with "
            f"--tasks {OFFLINE_TASKS}, or give your task's YAML folder with --include-path DIR",
        )
    return manager, names


def _unknown(manager: TaskManager, names: Sequence[str]) -> list[str]:
    known = set(manager.all_tasks)
    return [n for n in names if n not in known and not manager.match_tasks([n])]


def check_same_tokenizer(model_tokenizer: Any, baseline_tokenizer: Any, model: str, baseline: str) -> None:
    """Raise :class:`TokenizerMismatchError` unless both map the same strings to the same ids."""
    mine, theirs = model_tokenizer.get_vocab(), baseline_tokenizer.get_vocab()
    if mine == theirs:
        return
    differ = len(set(mine.items()) ^ set(theirs.items()))
    raise TokenizerMismatchError(
        f"--baseline {baseline} reads text with another tokenizer than {model} ({len(theirs):,} against "
        f"{len(mine):,} tokens, {differ:,} entries differ); give the source {model} was converted from"
    )


@dataclass(frozen=True)
class Score:
    """One metric of one task: lm-eval's value and standard error (NaN where it gives none)."""

    task: str
    metric: str
    value: float
    stderr: float
    higher_is_better: bool | None


def run_tasks(
    lm: ModifyLM,
    tasks: Sequence[str],
    manager: TaskManager,
    num_fewshot: int | None = None,
    limit: float | None = None,
) -> tuple[list[Score], dict[str, Any]]:
    """Evaluate ``lm`` on ``tasks``: the scores in the order lm-eval reports them, and lm-eval's results."""
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            verbosity="ERROR",
        )
    except (ConnectionError, OSError) as exc:
        # A task whose dataset lives on the hub, on a machine that can't reach it (or has no copy in the cache).
        raise ModifyError(
            f"a task's dataset could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
            f"run where the Hugging Face hub is reachable, or use the offline tasks (--tasks {OFFLINE_TASKS})"
        ) from None
    assert results is not None  # None only on a non-zero rank of a distributed run, which this never starts
    return _scores(results), results


def _scores(results: dict[str, Any]) -> list[Score]:
    scores = []
    for task, metrics in results["results"].items():
        better = results.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            if not _ or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{_filter}")
            scores.append(
                Score(
                    task=task,
                    metric=metric if _filter == "none" else f"{metric} ({_filter})",
                    value=float(value),
                    stderr=float(stderr) if isinstance(stderr, (int, float)) else float("nan"),
                    higher_is_better=better.get(metric),
                )
            )
    return scores
