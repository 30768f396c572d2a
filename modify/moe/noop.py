"""Integrated Mixture-of-Depths-and-Experts: a no-op expert in a Mixture-of-Experts layer's router.

The paper combines the two routers two ways. *Staged*: a Mixture-of-Depths router in front of the whole block,
the ordinary retrofit (:func:`modify.convert` with ``mode="staged"``). *Integrated*: the expert router itself
gets one more row, a no-op expert, so one router decides both which experts a token goes to and whether it
goes to any. Here the no-op row gives each token a logit q = w·x + b (zero at conversion). Per sequence the
ceil(c·T) tokens whose no-op logit stands lowest against their best real expert's logit are dispatched to the
experts (c, the capacity, is one minus the layer's no-op share); the others take the no-op expert and get no
expert output in that layer (attention is untouched: the no-op concerns the expert layer only, shared experts
included). Dispatched tokens' outputs are scaled by 2·sigmoid(-q), exactly 1 at conversion, which puts the
no-op row on the gradient path; the real experts' routing weights come from the layer's own router, unchanged.

Why a share per sequence rather than a threshold: it is the capacity rule of Mixture-of-Depths, so shapes are
static, FLOPs are known in advance (``modify.flops``) and share 0 reproduces the model exactly. At conversion
(q = 0) the tokens the router is least sure of (lowest best logit) take the no-op first; training moves q.

Inside ``generate()`` each token decides alone: it is dispatched when its margin is below the layer's
threshold, the capacity quantile of the margins (set by the first batch, a moving average in training, saved
with the weights; one running-threshold rule with the causal rule's, :mod:`modify.routing.thresholds`).

The router runs once on every token, so the layer's load-balancing loss still sees one row of router logits
per token (the choices of tokens that took the no-op count as if dispatched); the layer's own forward then
runs on the dispatched tokens with those rows. Padding tokens take the no-op first.

Injected by module name (``<block>.<moe>.mod_noop``) and reversible, like the routers.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modify.archs import MOE_PARTS
from modify.routing import thresholds
from modify.routing.arguments import recent_padding
from modify.routing.call import routed_call
from modify.routing.placement import Wrapped, unwrap_forward, wrap_forward
from modify.routing.selection import capacity_tokens, select_tokens
from modify.routing.state import Generation

__all__ = [
    "NOOP_ATTR",
    "NOOP_STATE_ATTR",
    "NoOpExpert",
    "NoOpState",
    "find_moe",
    "install_noop",
    "uninstall_noop",
    "leave_out_of_load_balancing",
    "noop_layers",
]

NOOP_ATTR = "mod_noop"
NOOP_STATE_ATTR = "_modify_noop"


class NoOpExpert(nn.Module):
    """The no-op row of an expert router: one logit per token, q = w·x + b, in float32, zero at conversion.

    ``threshold`` (saved with the weights) is the margin below which a token decides alone to go to the
    experts while sampling; NaN until the layer has seen a batch.
    """

    def __init__(self, hidden_size: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, hidden_size, device=device, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(1, device=device, dtype=torch.float32))
        self.register_buffer("threshold", torch.full((), math.nan, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight, self.bias).squeeze(-1)


@dataclass
class NoOpState:
    """What an MoE layer with a no-op expert needs besides its modules.

    Attributes:
        name: qualified name of the MoE layer.
        index: the block's position in the stack.
        capacity: share of each sequence's tokens dispatched to the experts (1 - the no-op share).
        forward_fn: the layer class's forward, run on the dispatched tokens.
        num_experts: real experts, from the router's weight.
        mode: the run-time switch, as a routed block's (:data:`modify.routing.state.MODES`): "dense" inside
            ``modify.routing_disabled`` (the layer runs on every token), else the no-op routes.
        generation: the model's :class:`~modify.routing.state.Generation`: inside ``generate()`` each token
            decides alone (see :func:`noop_forward`).
        input_padding: [B, P + T] bool, True at padding, from the model's ``attention_mask`` while it runs.
        counts: (dispatched real tokens, real tokens) of the last forward, as tensors: read on demand, so that
            a forward doesn't wait for the device.
        wrapped: where :func:`install_noop` put the forward (under any accelerate hook; see modify.routing.placement).
    """

    name: str
    index: int
    capacity: float
    forward_fn: Callable[..., Any]
    num_experts: int
    mode: str = "auto"
    generation: Generation = field(default_factory=Generation)
    input_padding: torch.Tensor | None = None
    counts: tuple[torch.Tensor, torch.Tensor] | None = None
    wrapped: Wrapped | None = None

    @property
    def enabled(self) -> bool:
        return self.mode != "dense"

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.mode = "auto" if value else "dense"

    @property
    def generating(self) -> bool:
        return self.generation.active

    @property
    def last_share(self) -> float:
        """The no-op share of the last forward's real tokens (0 before any)."""
        if self.counts is None:
            return 0.0
        kept, real = self.counts
        return float(1 - kept / real.clamp(min=1))


def noop_layers(model: nn.Module) -> list[tuple[nn.Module, NoOpState]]:
    """The Mixture-of-Experts layers given a no-op expert (``mode="integrated"``), with their states."""
    return [(m, getattr(m, NOOP_STATE_ATTR)) for m in model.modules() if hasattr(m, NOOP_STATE_ATTR)]


def find_moe(block: nn.Module) -> tuple[str, nn.Module] | None:
    """The block's Mixture-of-Experts layer: a module with a router child (a 2-D ``weight``, one row per
    expert) and an experts child, named as in :data:`modify.archs.MOE_PARTS`; None if it has none."""
    router_name, experts_name = MOE_PARTS
    for name, module in block.named_modules():
        router, experts = getattr(module, router_name, None), getattr(module, experts_name, None)
        weight = getattr(router, "weight", None)
        if isinstance(router, nn.Module) and isinstance(experts, nn.Module) and torch.is_tensor(weight):
            if weight.dim() == 2:
                return name, module
    return None


@contextlib.contextmanager
def _router_returns(moe: nn.Module, result: tuple[Any, ...]) -> Iterator[None]:
    """Inside, the layer's ``self.gate(x)`` returns ``result`` without running (or being recorded) again."""
    name = MOE_PARTS[0]
    moe.__dict__[name] = lambda *args, **kwargs: result  # found before nn.Module's registry
    try:
        yield
    finally:
        del moe.__dict__[name]


def noop_forward(moe: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The layer with its no-op expert: per sequence the ceil(c·T) tokens of lowest margin are dispatched; inside
    ``generate()`` each token decides alone, dispatched when its margin is below the layer's threshold."""
    state: NoOpState = getattr(moe, NOOP_STATE_ATTR)
    if state.mode == "dense":
        return state.forward_fn(moe, hidden_states, *args, **kwargs)
    batch, length, dim = hidden_states.shape
    flat = hidden_states.reshape(-1, dim)
    routed = getattr(moe, MOE_PARTS[0])(flat)  # (logits, weights, experts) for every token, recorded once
    noop: NoOpExpert = getattr(moe, NOOP_ATTR)
    q = noop(flat).view(batch, length)
    padding = recent_padding(state.input_padding, batch, length)
    real = ~padding if padding is not None else torch.ones_like(q, dtype=torch.bool)
    # The no-op's margin over the best real expert; the lowest margins are dispatched.
    margin = q - routed[0].detach().float().max(-1).values.view(batch, length)
    if state.generating and state.capacity < 1:
        dispatched = real & ((margin < noop.threshold) | noop.threshold.isnan())
        rows = dispatched.reshape(-1).nonzero().squeeze(-1)
    else:
        idx = select_tokens(-margin, capacity_tokens(state.capacity, length), padding)
        rows = (idx + torch.arange(batch, device=idx.device).unsqueeze(1) * length).reshape(-1)
        quantile = thresholds.quantile_of(margin, real, state.capacity)
        (thresholds.follow if moe.training else thresholds.start)(noop.threshold, quantile)
    out = flat.new_zeros(1, *flat.shape)
    if rows.numel():

        def run(tokens: torch.Tensor) -> tuple[list[torch.Tensor], None]:
            with _router_returns(moe, tuple(r[rows] for r in routed)):
                part = state.forward_fn(moe, tokens, *args, **kwargs)
            if not torch.is_tensor(part):
                raise TypeError(f"{state.name} returned {type(part).__name__}; an integrated no-op needs a tensor")
            return [part], None

        gate = 2 * torch.sigmoid(-q.reshape(1, -1)[:, rows])  # 1 at conversion
        # The experts work token by token, so the batch's dispatched tokens run as one sequence.
        out, _ = routed_call(flat.unsqueeze(0), rows.unsqueeze(0), gate, run, base=out)
    with torch.no_grad():
        kept = torch.zeros(batch * length, dtype=torch.bool, device=q.device).index_fill_(0, rows, True)
        state.counts = ((kept.view(batch, length) & real).sum(), real.sum())
    return out.view(batch, length, dim)


def leave_out_of_load_balancing(router: nn.Module, state: Any) -> Any | None:
    """For a staged routed block's MoE router: while transformers records router logits for the
    load-balancing loss, hand the recorder None instead (it skips None), so the loss leaves the layer out.

    Why: the loss weights one row per token by the attention mask, and a routed block's router sees only its
    k tokens per sequence. The layer's own forward ignores the logits (it takes the top-k weights and experts).
    """
    # optional dependency: transformers' private recorder of router logits, which other versions lack
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers that records router logits some other way: nothing to leave out
        return None

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        collecting = _active_collector.get()
        if state.enabled and collecting is not None and "router_logits" in collecting and isinstance(output, tuple):
            return (None, *output[1:])
        return output

    return router.register_forward_hook(hook, prepend=True)


def install_noop(moe: nn.Module, state: NoOpState, noop: NoOpExpert) -> None:
    if NOOP_ATTR not in moe._modules:
        moe.add_module(NOOP_ATTR, noop)
    setattr(moe, NOOP_STATE_ATTR, state)
    state.wrapped = wrap_forward(moe, types.MethodType(noop_forward, moe))


def uninstall_noop(moe: nn.Module) -> None:
    if NOOP_ATTR in moe._modules:
        del moe._modules[NOOP_ATTR]
    state = moe.__dict__.pop(NOOP_STATE_ATTR, None)
    if state is not None and state.wrapped is not None:
        unwrap_forward(moe, noop_forward, state.wrapped)
