"""The Mixture-of-Depths plan of a converted model, saved inside the model's config.json."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from modify.routing.kv_all import KV_OPTIONS
from modify.routing.skip_path import parse_spec

__all__ = [
    "MoDConfig",
    "CONFIG_KEY",
    "LOAD_MARKER_KEY",
    "QUANT_METHOD",
    "mark_loadable",
    "unmark_loadable",
    "ROUTER_KINDS",
    "GATE_KINDS",
    "CAUSAL_RULES",
    "MODES",
]

#: The attribute of a Hugging Face config (and key of config.json) that holds the plan.
CONFIG_KEY = "mixture_of_depths"
ROUTER_KINDS = ("linear",)
#: "sigmoid": g(r) = 2 * sigmoid(s * r) with a learnt scale s. Equal to 1 when s = 0 (a new router, random or
#: calibrated) or r = 0 (a zero router), so conversion keeps the pretrained function; bounded in
#: (0, 2), so a router that drifts can neither blow up a block's contribution nor flip its sign (the
#: instability reported by users of unbounded routers).
GATE_KINDS = ("sigmoid",)
#: How a token decides alone whether a routed block processes it when sampling (top-k over a sequence is not
#: causal): "threshold": router score > the block's threshold (the score quantile that routes the block's
#: capacity); "aux": router score > 0, the router trained with an auxiliary BCE on top-k membership;
#: "predictor": a small MLP on the stop-gradient block input, trained on the same targets, logit > 0.
CAUSAL_RULES = ("threshold", "aux", "predictor")
#: 2: ``kv`` per routed block (version 1 plans have none and load as "routed", as they ran).
_VERSION = 2

#: How routing meets a Mixture-of-Experts layer (both work on dense blocks too, "integrated" only on MoE blocks).
MODES = ("staged", "integrated")


@dataclass
class MoDConfig:
    """Which blocks are routed and how.

    Args:
        num_blocks: number of blocks in the model's block stack.
        routed: indices of the routed blocks, ascending.
        capacities: fraction of each sequence's tokens that pass through each routed block, in [0, 1]; 0 removes
            the block (no token runs it, nor its router; a skip path, if any, still gives every token its estimate).
        router: router kind; "linear" is one linear map from the hidden state to a float32 score.
        gate: gate applied to the router score; see ``GATE_KINDS``.
        block_stack: qualified name of the module list holding the blocks (filled in by ``convert``).
        skip_paths: what each routed block gives the tokens it skips, as a spec: "identity" (nothing: the
            paper's rule), "linear-R" or "mlp-R" (see :mod:`modify.routing.skip_path`); empty means identity everywhere.
        kv: what each routed block's skipped tokens leave in its attention: "routed" (nothing, the paper's rule:
            a routed token attends to the other routed tokens) or "all" (their keys and values: a routed token
            attends to every token, see :mod:`modify.routing.kv_all`); empty means "routed" everywhere.
        keep_first: the first ``keep_first`` real tokens of every sequence always go through routed blocks
            (0 is the paper's pure top-k; 1 keeps the attention sink of a pretrained model).
        source: where the converted checkpoint came from (``kind``, ``path``, ``gguf_file``, ``model_id``), as
            recorded by ``modify convert``; ``modify verify`` reloads it.
        causal: how a token decides alone when sampling; see ``CAUSAL_RULES``.
        thresholds: per routed block, the decision threshold of the "threshold" rule (router scores above it
            are processed), or None where none was fitted or trained yet: then the first text the block sees
            (a prompt, a batch) sets it to the capacity quantile of its scores. Empty means None everywhere.
            "aux" decides at 0; "predictor" reads the router's margin over the threshold.
        aux_loss_coef: coefficient of the "aux" / "predictor" loss added to ``outputs.loss``.
        predictor_size: hidden units of each block's predictor MLP ("predictor" rule).
        calibration: for a calibrated plan, everything needed to reproduce and judge it (data fingerprint,
            token count, sequence length, grid, budget, per-block sensitivity, predicted and measured loss).
        mode: "staged" (a Mixture-of-Depths router in front of each routed block) or "integrated" (a no-op
            expert in each routed block's Mixture-of-Experts router; capacity is the share of tokens dispatched
            to the experts, see :mod:`modify.moe.noop`).
        version: format version, for migrating configs saved by older releases.
    """

    num_blocks: int = field(metadata={"help": "number of blocks in the block stack"})
    routed: list[int] = field(default_factory=list, metadata={"help": "indices of routed blocks"})
    capacities: list[float] = field(default_factory=list, metadata={"help": "capacity of each routed block"})
    router: str = field(default="linear", metadata={"help": "router kind"})
    gate: str = field(default="sigmoid", metadata={"help": "gate g(r) scaling the block's contribution"})
    block_stack: str = field(default="", metadata={"help": "qualified name of the block list"})
    keep_first: int = field(default=0, metadata={"help": "leading tokens every routed block always processes"})
    skip_paths: list[str] = field(default_factory=list, metadata={"help": "skip path of each routed block"})
    kv: list[str] = field(
        default_factory=list, metadata={"help": "what skipped tokens leave in each block's attention"}
    )
    causal: str = field(default="threshold", metadata={"help": "causal decision rule for sampling"})
    thresholds: list[float | None] = field(default_factory=list, metadata={"help": "threshold of each routed block"})
    aux_loss_coef: float = field(default=0.01, metadata={"help": "coefficient of the causal routing loss"})
    predictor_size: int = field(default=128, metadata={"help": "hidden units of the predictor MLP"})
    source: dict[str, Any] = field(default_factory=dict, metadata={"help": "the checkpoint converted"})
    calibration: dict[str, Any] = field(default_factory=dict, metadata={"help": "how the plan was calibrated"})
    mode: str = field(default="staged", metadata={"help": "staged (MoD router per block) or integrated (MoE no-op)"})
    version: int = field(default=_VERSION, metadata={"help": "format version"})

    def __post_init__(self) -> None:
        self.routed = [int(i) for i in self.routed]
        self.capacities = [float(c) for c in self.capacities]
        self.skip_paths = [str(s) for s in self.skip_paths] or ["identity"] * len(self.routed)
        self.kv = [str(k) for k in self.kv] or ["routed"] * len(self.routed)
        self.thresholds = [None if t is None else float(t) for t in self.thresholds] or [None] * len(self.routed)
        if self.version > _VERSION:
            raise ValueError(f"MoDConfig version {self.version} is newer than this modify ({_VERSION}); upgrade modify")
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if len(self.capacities) != len(self.routed):
            raise ValueError(
                f"got {len(self.capacities)} capacities for {len(self.routed)} routed blocks; give one per routed block"
            )
        if self.routed != sorted(set(self.routed)):
            raise ValueError(f"routed block indices must be unique and ascending, got {self.routed}")
        for i in self.routed:
            if not 0 <= i < self.num_blocks:
                raise ValueError(f"block index {i} is out of range: valid indices are 0..{self.num_blocks - 1}")
        if len(self.skip_paths) != len(self.routed):
            raise ValueError(
                f"got {len(self.skip_paths)} skip paths for {len(self.routed)} routed blocks; give one per routed block"
            )
        for spec in self.skip_paths:
            parse_spec(spec)
        if len(self.kv) != len(self.routed):
            raise ValueError(
                f"got {len(self.kv)} kv options for {len(self.routed)} routed blocks; give one per routed block"
            )
        bad = next((k for k in self.kv if k not in KV_OPTIONS), None)
        if bad is not None:
            raise ValueError(f"unknown kv option {bad!r}; choose one of {KV_OPTIONS}")
        for c in self.capacities:
            if not (math.isfinite(c) and 0.0 <= c <= 1.0):
                raise ValueError(f"capacity {c} is out of range: it must be in [0, 1] (0 removes a block), e.g. 0.125")
        if len(self.thresholds) != len(self.routed):
            raise ValueError(
                f"got {len(self.thresholds)} thresholds for {len(self.routed)} routed blocks; give one per routed block"
            )
        if not all(t is None or math.isfinite(t) for t in self.thresholds):
            raise ValueError(f"thresholds must be finite numbers or None (not fitted yet), got {self.thresholds}")
        if self.causal not in CAUSAL_RULES:
            raise ValueError(f"unknown causal routing rule {self.causal!r}; choose one of {CAUSAL_RULES}")
        if not (math.isfinite(self.aux_loss_coef) and self.aux_loss_coef >= 0):
            raise ValueError(f"aux_loss_coef must be a finite number >= 0, got {self.aux_loss_coef}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {MODES}")
        if self.mode == "integrated" and 0.0 in self.capacities:
            raise ValueError("capacity 0 (removing a block) is staged only; use mode='staged' or a capacity above 0")
        if self.predictor_size < 1:
            raise ValueError(f"predictor_size must be >= 1, got {self.predictor_size}")
        if self.keep_first < 0:
            raise ValueError(f"keep_first must be >= 0, got {self.keep_first}")
        if self.router not in ROUTER_KINDS:
            raise ValueError(f"unknown router kind {self.router!r}; choose one of {ROUTER_KINDS}")
        if self.gate not in GATE_KINDS:
            raise ValueError(f"unknown gate kind {self.gate!r}; choose one of {GATE_KINDS}")

    def capacity_of(self, index: int) -> float | None:
        """The capacity of block ``index``, or None when it is not routed."""
        return self.capacities[self.routed.index(index)] if index in self.routed else None

    @property
    def removed(self) -> list[int]:
        """The blocks at capacity 0: removed, no token runs them."""
        return [i for i, c in zip(self.routed, self.capacities) if c == 0.0]

    def skip_path_of(self, index: int) -> str | None:
        """The skip path of block ``index``, or None when it is not routed."""
        return self.skip_paths[self.routed.index(index)] if index in self.routed else None

    def kv_of(self, index: int) -> str | None:
        """The kv option of block ``index`` ("routed" or "all"), or None when it is not routed."""
        return self.kv[self.routed.index(index)] if index in self.routed else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoDConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MoDConfig keys {unknown}; was it written by a newer modify?")
        thresholds = data.get("thresholds") or []
        if data.get("causal", "threshold") == "threshold" and thresholds and all(t == 0.0 for t in thresholds):
            # Releases before None existed wrote 0.0 for "never fitted"; a fitted quantile is never exactly 0 in
            # every block, and 0.0 taken literally would skip every token of an untrained router.
            data = {**data, "thresholds": [None] * len(thresholds)}
        return cls(**data)


#: The key of config.json through which ``transformers`` finds modify's loading hook (its quantizer extension
#: point; see :mod:`modify.io.hf_integration`), and the method named there.
LOAD_MARKER_KEY = "quantization_config"
QUANT_METHOD = "modify"


def mark_loadable(config: Any) -> None:
    """Put the loading hook's marker on a Hugging Face config, so that every ``save_pretrained`` (the model's,
    a Trainer checkpoint's, ``push_to_hub``'s) writes it and the checkpoint reloads with its routers.

    A config that already names another quantization method keeps it: modify can't load through two hooks.
    """
    if not callable(getattr(config, "to_dict", None)):
        return
    current = config.__dict__.get(LOAD_MARKER_KEY)
    if current is None or _method(current) == QUANT_METHOD:
        setattr(config, LOAD_MARKER_KEY, {"quant_method": QUANT_METHOD})


def unmark_loadable(config: Any) -> None:
    """Remove the marker :func:`mark_loadable` put (a foreign quantization config stays)."""
    if _method(config.__dict__.get(LOAD_MARKER_KEY)) == QUANT_METHOD:
        del config.__dict__[LOAD_MARKER_KEY]


def _method(value: Any) -> Any:
    return value.get("quant_method") if isinstance(value, dict) else getattr(value, "quant_method", None)
