"""What ``modify bench`` runs: named model shapes with random weights, and plans to apply to them.

A named shape needs no download: the architecture of a known checkpoint, random weights, optionally fewer
blocks (``--depth``) so that a 7B shape's blocks fit a small machine. Speed per block doesn't depend on the
weights' values; the routers get random weights so that top-k picks scattered tokens as a trained router
does (a zero router picks the first k, a contiguous gather no real model sees).

Plans: ``paper`` (every other block at 0.125, the paper's best), ``LAYERS@CAPACITY`` (``all@0.125``,
``every-other@0.5``, ``1,3,5@0.25``), ``saved`` (a converted model's own plan) or a ``PLAN.json`` from
``modify calibrate``. The model is converted once on every block any plan routes; a plan then enables
its blocks at its capacities and runs the others densely (:func:`apply_plan`).

What a plan's skipped tokens leave in attention (``kv``, :mod:`modify.routing.kv_all`) is the plan's own for
``saved`` and a PLAN.json, "routed" for the others; ``--kv`` sets it for every plan (:func:`with_kv`), and a plan
benchmarked with kv="all" is labelled ``PLAN+kv=all``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from modify.api import parse_layers, resolve_layers, routed_blocks
from modify.calibrate.plan_file import load_plan
from modify.config import CONFIG_KEY
from modify.errors import UsageError
from modify.routing.kv_all import KV_OPTIONS

__all__ = ["SHAPES", "BenchPlan", "parse_plan", "with_kv", "build_shape", "apply_plan", "randomize_routers"]

#: name -> (transformers config class, its arguments, blocks of the real model). Llama-architecture shapes
#: of SmolLM2-135M, Llama-3.2-1B and Llama-2-7B (from their config.json files).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192,
    ),
    "llama-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_theta=500000.0,
        max_position_embeddings=131072,
    ),
    "llama-7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, tie_word_embeddings=False, max_position_embeddings=4096,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class BenchPlan:
    """A plan to benchmark: ``label`` as given, per routed block index its capacity, and its kv option
    ("routed" or "all"; a block missing from ``kv`` is "routed")."""

    label: str
    capacities: dict[int, float]
    kv: dict[int, str] = field(default_factory=dict)

    def kv_of(self, index: int) -> str:
        return self.kv.get(index, "routed")

    def describe(self) -> str:
        values = sorted(set(self.capacities.values()))
        text = f"{len(self.capacities)} blocks at {'/'.join(f'{c:g}' for c in values)}"
        shared = sorted({self.kv_of(i) for i in self.capacities})
        if shared == ["all"]:
            return f"{text}, kv=all"
        if len(shared) > 1:
            return f"{text}, kv=all on {sum(self.kv_of(i) == 'all' for i in self.capacities)}"
        return text


def with_kv(plan: BenchPlan, option: str) -> BenchPlan:
    """``plan`` with every routed block at kv ``option``; labelled ``LABEL+kv=all`` for "all"."""
    if option not in KV_OPTIONS:
        raise UsageError(f"unknown kv option {option!r}; use --kv {' or --kv '.join(KV_OPTIONS)}")
    label = plan.label.removesuffix("+kv=all") + ("+kv=all" if option == "all" else "")
    return replace(plan, label=label, kv={i: option for i in plan.capacities})


def _saved_kv(routed: list[int], kv: list[str] | None) -> dict[int, str]:
    return dict(zip(routed, kv)) if kv else {}


def parse_plan(text: str, num_blocks: int, saved: dict[str, Any] | None = None) -> BenchPlan:
    """A :class:`BenchPlan` from ``paper``, ``LAYERS@CAPACITY``, ``saved`` or a PLAN.json path."""
    if text == "paper":
        text_layers, capacity = "every-other", 0.125
    elif text == "saved":
        if saved is None:
            raise UsageError("plan 'saved' needs a converted MODEL; give paper, LAYERS@CAPACITY or a PLAN.json")
        routed = saved["routed"]
        plan = BenchPlan("saved", dict(zip(routed, saved["capacities"])), _saved_kv(routed, saved.get("kv")))
        return with_kv(plan, "all") if set(plan.kv.values()) == {"all"} else plan
    elif "@" in text:
        text_layers, _, cap_text = text.rpartition("@")
        try:
            capacity = float(cap_text)
        except ValueError:
            raise UsageError(f"plan {text!r}: capacity {cap_text!r} is not a number; e.g. all@0.125") from None
        if not 0 < capacity <= 1:
            raise UsageError(f"plan {text!r}: capacity {capacity:g} is out of (0, 1]; e.g. all@0.125")
    elif text.endswith(".json"):
        return _plan_file(Path(text), num_blocks)
    else:
        raise UsageError(f"unknown plan {text!r}; use paper, LAYERS@CAPACITY (all@0.125, every-other@0.5) or PLAN.json")
    try:
        layers = resolve_layers(parse_layers(text_layers), num_blocks)
    except ValueError as exc:
        raise UsageError(f"plan {text!r}: {exc}") from None
    return BenchPlan(text, {i: capacity for i in layers})


def _plan_file(path: Path, num_blocks: int) -> BenchPlan:
    if not path.is_file():
        raise UsageError(f"plan file {path} does not exist; write one with 'modify calibrate --out {path}'")
    calibration, _ = load_plan(path)
    plan = calibration.plan()
    if plan.num_blocks != num_blocks:
        raise UsageError(f"{path} is a plan for {plan.num_blocks} blocks but the model has {num_blocks}")
    kv = _saved_kv(plan.routed, getattr(plan, "kv", None))
    found = BenchPlan(str(path), dict(zip(plan.routed, plan.capacities)), kv)
    return with_kv(found, "all") if set(found.kv.values()) == {"all"} else found


def build_shape(name: str, depth: int | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialised Llama-architecture model of the named shape (see :data:`SHAPES`)."""
    if name not in SHAPES:
        raise UsageError(f"unknown model shape {name!r}; named shapes are {', '.join(SHAPES)}")
    kwargs = dict(SHAPES[name])
    if depth is not None:
        kwargs["num_hidden_layers"] = depth
    config = LlamaConfig(**kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype).eval()


def randomize_routers(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block, _ in routed_blocks(model):
            w = block.mod_router.weight
            w.copy_(torch.randn(w.shape, generator=gen).to(w.device) / w.shape[-1] ** 0.5)


def apply_plan(model: nn.Module, plan: BenchPlan) -> None:
    """Route the plan's blocks at its capacities and kv options; run the model's other routed blocks densely."""
    for _, state in routed_blocks(model):
        state.enabled = state.index in plan.capacities
        if state.enabled:
            state.capacity = plan.capacities[state.index]
            if plan.kv_of(state.index) == "all" and state.program.attention is None:
                raise UsageError(f"plan {plan.label!r}: block {state.index} was converted with kv='routed'")
            state.kv = plan.kv_of(state.index)


def saved_plan(model: nn.Module) -> dict[str, Any] | None:
    plan = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    return json.loads(json.dumps(plan)) if isinstance(plan, dict) else None
