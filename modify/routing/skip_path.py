"""Skip paths: what a routed block gives the tokens it does not process.

Under pure Mixture-of-Depths (``identity``, the paper's rule) a skipped token leaves the block unchanged. A skip
path instead adds a cheap estimate Δ̂ of the block's contribution, computed from the block's input after the
block's own input norm (where it has one), as FlexiDepth's adapter does for the tokens it skips:

    routed tokens:   x + g(r)·Δ(x)          (the block, on k = ceil(c·T) tokens)
    skipped tokens:  x + Δ̂(norm(x))         (the skip path, on the other T - k)

Kinds (``SKIP_KINDS``), each named with its size as a *spec* such as ``"linear-32"``:

- ``identity``: Δ̂ = 0; no parameters, no FLOPs.
- ``linear``: Δ̂ = U·(A·n + a), rank r: 4·D·r FLOPs per skipped token.
- ``mlp``: Δ̂ = W₂·silu(W₁·n + b₁) + b₂, r hidden units: 4·D·r FLOPs per skipped token.

A new skip path starts at Δ̂ = 0 (its output layer is zero, as LoRA's B), so a converted model computes what
pure MoD computes until the path is fitted (:mod:`modify.calibrate.skip_fit`) or trained. Its parameters live
on the block as ``<block>.mod_skip_path.*``, so training can select them by name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "SKIP_ATTR",
    "SKIP_KINDS",
    "LinearSkipPath",
    "MLPSkipPath",
    "make_skip_path",
    "parse_spec",
    "spec_name",
    "skip_path_flops",
]

#: Name of the skip-path submodule on a routed block; parameter names contain "skip_path".
SKIP_ATTR = "mod_skip_path"
SKIP_KINDS = ("identity", "linear", "mlp")


class _TwoLayerSkipPath(nn.Module):
    """hidden → rank → hidden, the second layer at zero: a new skip path estimates Δ̂ = 0 (changes nothing).
    Subclasses name the two layers (their names are the checkpoint's keys) and the activation between them."""

    layers: tuple[str, str]
    out_bias: bool

    def __init__(self, hidden_size: int, rank: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:  # fmt: skip
        super().__init__()
        first = nn.Linear(hidden_size, rank, bias=True, device=device, dtype=dtype)
        second = nn.Linear(rank, hidden_size, bias=self.out_bias, device=device, dtype=dtype)
        for param in second.parameters():
            nn.init.zeros_(param)
        self.add_module(self.layers[0], first)
        self.add_module(self.layers[1], second)

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def forward(self, n: torch.Tensor) -> torch.Tensor:
        first, second = (getattr(self, name) for name in self.layers)
        return second(self.activation(first(n)))


class LinearSkipPath(_TwoLayerSkipPath):
    """Δ̂ = up(down(n)): a rank-``rank`` linear map of the normed block input to the block's contribution."""

    layers, out_bias = ("down", "up"), False


class MLPSkipPath(_TwoLayerSkipPath):
    """Δ̂ = fc2(silu(fc1(n))): a small MLP with ``rank`` hidden units."""

    layers, out_bias = ("fc1", "fc2"), True

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(h)


def parse_spec(spec: str) -> tuple[str, int]:
    """``"linear-32"`` -> ("linear", 32); ``"identity"`` -> ("identity", 0)."""
    kind, _, size = spec.partition("-")
    if kind == "identity" and not size:
        return kind, 0
    if kind not in SKIP_KINDS or not size.isdigit() or int(size) < 1:
        raise ValueError(f"unknown skip path {spec!r}; use identity, linear-R or mlp-R with R >= 1, e.g. linear-32")
    return kind, int(size)


def spec_name(kind: str, rank: int) -> str:
    """The spec naming a skip path of ``kind`` and size ``rank`` (the inverse of :func:`parse_spec`)."""
    if kind not in SKIP_KINDS:
        raise ValueError(f"unknown skip path {kind!r}; choose one of {', '.join(SKIP_KINDS)}")
    if kind == "identity":
        return kind
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"skip rank {rank!r} must be a positive integer, e.g. 32")
    return f"{kind}-{rank}"


def make_skip_path(
    spec: str, hidden_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> nn.Module | None:
    """A fresh skip path (Δ̂ = 0) for ``spec``, or None for identity."""
    kind, rank = parse_spec(spec)
    if kind == "identity":
        return None
    cls = LinearSkipPath if kind == "linear" else MLPSkipPath
    module = cls(hidden_size, rank, device=device, dtype=dtype)
    first = module.down if kind == "linear" else module.fc1
    if first.weight.device.type != "meta":
        # LoRA's A: random so that the zero output layer receives gradient from the first step.
        with torch.no_grad():
            nn.init.kaiming_uniform_(first.weight, a=math.sqrt(5))
            nn.init.zeros_(first.bias)
    return module


def skip_path_flops(spec: str, hidden_size: int) -> int:
    """Forward FLOPs of the skip path per skipped token (matrix products, as ``torch.utils.flop_counter``)."""
    kind, rank = parse_spec(spec)
    return 0 if kind == "identity" else 4 * hidden_size * rank
