"""Shared test helpers: toy models and hooks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ToyBlock(nn.Module):
    """A small block in one of several residual shapes (for pass tests without transformers)."""

    def __init__(self, dim: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "pre-norm":
            h = x + self.attn(self.norm1(x))
            return h + self.mlp(self.norm2(h))
        if self.kind == "parallel":
            return x + (self.attn(self.norm1(x)) + self.mlp(self.norm2(x)))
        if self.kind == "post-norm":
            h = self.norm1(x + self.attn(x))
            return self.norm2(h + self.mlp(h))
        if self.kind == "no-residual":
            return self.mlp(self.norm1(x))
        raise ValueError(self.kind)


class ToyModel(nn.Module):
    def __init__(self, kind: str, dim: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ToyBlock(dim, kind) for _ in range(depth))
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def toy_inputs(length: int) -> dict[str, Any]:
    return {"x": torch.randn(2, length, 8, generator=torch.Generator().manual_seed(length))}


class Recorder:
    """Records the keyword arguments (or first argument) of every call to a module."""

    def __init__(self, module: nn.Module) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls.append((args, kwargs))

    def remove(self) -> None:
        self.handle.remove()


def set_router_weights(model: nn.Module, std: float = 1.0, seed: int = 1) -> None:
    """Give every router random weights and bias and gate scale 1, so that top-k picks by content and the
    gates follow the scores (a trained router; a fresh one's gate scale is 0, every gate exactly 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name and not name.endswith("scale"):
                p.copy_(torch.randn(p.shape, generator=gen) * std / max(1, p.shape[-1]) ** 0.5)
    open_gates(model)


def open_gates(model: nn.Module, scale: float = 1.0) -> None:
    """Set every router's gate scale, as training moves it: a fresh router's is 0 (its gates are exactly 1,
    and its weights get gradient only once the scale moves), so gradient tests of one step open the gates."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name and name.endswith("scale"):
                p.fill_(scale)


class BlockIO:
    """Records a block's hidden-states input ``x`` and output ``y`` on its next calls."""

    def __init__(self, block: nn.Module) -> None:
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self._handles = [
            block.register_forward_pre_hook(lambda m, a: setattr(self, "x", a[0])),
            block.register_forward_hook(lambda m, a, out: setattr(self, "y", out)),
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
