"""The per-block router: one float32 score per token, and the gate that scales the block's contribution."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["MoDRouter", "MoDPredictor", "ROUTER_ATTR", "PREDICTOR_ATTR"]

#: Name of the router submodule on a routed block; its parameters are "<block>.mod_router.weight/bias".
ROUTER_ATTR = "mod_router"
#: Name of the causal predictor submodule on a routed block (the "predictor" causal rule).
PREDICTOR_ATTR = "mod_predictor"


class _Float32(nn.Module):
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any, **kwargs: Any) -> _Float32:
        """Apply ``fn`` as ``nn.Module`` does, but keep floating-point tensors float32.

        Why: ``model.to(torch.bfloat16)``, ``.half()`` and ``.bfloat16()`` all reach the parameters through
        ``_apply``; a bfloat16 router ties scores (top-k becomes arbitrary) and its small updates round away.
        Like Hugging Face's ``_keep_in_fp32_modules``, the router stays float32. A conversion that would change
        the dtype keeps the original float32 values (not a float32 copy of the rounded ones); device moves and
        everything else ``fn`` does still apply, to parameters, buffers and gradients alike.
        """

        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.dtype == torch.float32 and out.is_floating_point() and out.dtype != torch.float32:
                return t.to(out.device)
            if out.is_floating_point() and out.dtype != torch.float32:
                return out.float()
            return out

        return super()._apply(keep_float32, *args, **kwargs)


def _float32_input(x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    # float32 whatever the model's dtype, autocast included: bfloat16 scores tie often and make top-k
    # arbitrary. (Only CPU and CUDA-like devices have autocast; meta tensors have none to leave.)
    autocast = x.device.type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(x.device.type)
    return torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext()


class MoDRouter(_Float32):
    """r = w·x + b in float32 picks the tokens; the gate g(r) = 2·sigmoid(s·r) scales their contribution.

    A new router starts with random weights (w ~ N(0, 1/D), seeded, so a conversion is reproducible) and the
    gate scale s at 0: every gate is exactly 1, so capacity 1.0 reproduces the pretrained model, while the
    scores already differ from token to token. A zero router would tie every score, and ties go to earlier
    positions: top-k would route each sequence's first k tokens, a positional rule training starts from and
    sampling can't follow (no score passes a threshold of 0). s receives gradient (through r) from the first
    step, and w through s once s moves.

    Routers fitted to calibration data (:mod:`modify.calibrate.calibration`) start the same way, with fitted
    weights in place of random ones.

    Args:
        hidden_size: size of the hidden states scored.
        device: where the parameters live.
        seed: seeds the random start; None starts at zero with s = 1 (a skeleton whose weights a checkpoint
            fills, or a router that must not depend on a seed; its gates are 1 too).
    """

    def __init__(self, hidden_size: int, device: torch.device | str | None = None, seed: int | None = None) -> None:
        super().__init__()
        weight = torch.zeros(1, hidden_size, dtype=torch.float32, device=device)
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
            start = torch.randn(1, hidden_size, generator=generator, dtype=torch.float32) * hidden_size**-0.5
            weight = start.to(weight.device)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(1, dtype=torch.float32, device=device))
        self.scale = nn.Parameter(
            torch.full((1,), 0.0 if seed is not None else 1.0, dtype=torch.float32, device=device)
        )
        # The "threshold" causal rule's threshold (modify.routing.rules); NaN until fitted, trained or set from
        # text. A buffer, so that training moves it in place without a host sync (torch.compile keeps one graph)
        # and it follows the model's device; persistent, so that every save_pretrained (a Trainer checkpoint's
        # too, which doesn't refresh the plan in config.json) keeps the value training left.
        self.register_buffer("threshold", torch.full((), math.nan, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] hidden states -> [B, T] float32 scores."""
        with _float32_input(x):
            return torch.nn.functional.linear(x.float(), self.weight.float(), self.bias.float()).squeeze(-1)

    def gate(self, scores: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(self.scale.float() * scores)


class MoDPredictor(_Float32):
    """The paper's causal predictor: a small MLP that guesses, from a token's block input alone, whether top-k
    would route it; logit > 0 means "process". It reads the input (RMS-normalised) through a stop-gradient, so
    training it (a BCE on top-k membership, :mod:`modify.routing.rules`) leaves the language model untouched.

    Its logit is ``a·(r - t) + mlp(x)``: the router's score r against the block's threshold t (both held
    fixed here), scaled by a learnt ``a`` (1 at first), plus the MLP's correction, whose output layer starts
    at zero. So a new predictor decides exactly as the threshold rule does, and training can only refine it.

    Args:
        hidden_size: size of the hidden states read.
        size: hidden units.
    """

    def __init__(self, hidden_size: int, size: int = 128, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, size, device=device, dtype=torch.float32)
        self.fc2 = nn.Linear(size, 1, device=device, dtype=torch.float32)
        self.score_scale = nn.Parameter(torch.ones(1, device=device, dtype=torch.float32))
        with torch.no_grad():
            self.fc2.weight.zero_()
            self.fc2.bias.zero_()

    def forward(self, x: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, D] hidden states (and the [B, T] router margin r - t) -> [B, T] float32 logits."""
        with _float32_input(x):
            x = x.detach().float()
            # Scale-free input: the residual stream's norm grows with depth and carries outlier dimensions,
            # which a small MLP trained for a few hundred steps learns around poorly.
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            logit = self.fc2(torch.nn.functional.silu(self.fc1(x))).squeeze(-1)
            return logit if margin is None else logit + self.score_scale * margin.detach().float()
