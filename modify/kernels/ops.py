"""The routing ops as torch custom ops: ``torch.ops.modify.gather_tokens`` and ``torch.ops.modify.gated_scatter_add``.

Registered with ``torch.library.custom_op`` (schema, fake implementation, autograd), so that the routed
block shows as one named node in FX and export graphs and ``torch.compile(fullgraph=True)`` treats each op
as opaque instead of breaking the graph. Each op picks its implementation per call:

- ``"reference"``: :mod:`modify.kernels.reference` (PyTorch);
- ``"triton"``: the fused kernels of :mod:`modify.kernels.gather_tokens` and :mod:`modify.kernels.gated_scatter_add`.

The backend is ``"auto"`` by default: Triton for CUDA tensors when triton is installed, the reference
otherwise (CPU). ``MODIFY_KERNELS=reference|triton|auto`` or :func:`use_backend` overrides it; "triton" on
CPU tensors needs ``TRITON_INTERPRET=1`` set before this module is imported (the tests' way to run the
kernels without a GPU). ``MODIFY_DEBUG=1`` checks every index against the sequence length (a device sync).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import torch

from modify.kernels import reference

__all__ = ["gather_tokens", "gated_scatter_add", "use_backend", "backend", "BACKENDS"]

BACKENDS = ("auto", "reference", "triton")
_state = {"backend": os.environ.get("MODIFY_KERNELS", "auto")}
if _state["backend"] not in BACKENDS:
    raise ValueError(f"MODIFY_KERNELS={_state['backend']!r} is not one of {BACKENDS}")
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def backend() -> str:
    return _state["backend"]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the routing ops with backend ``name`` ("auto", "reference" or "triton") inside the context."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    previous, _state["backend"] = _state["backend"], name
    try:
        yield
    finally:
        _state["backend"] = previous


def _triton_for(t: torch.Tensor) -> bool:
    name = _state["backend"]
    if name == "reference":
        return False
    if name == "auto":
        return t.is_cuda and _HAS_TRITON
    if not _HAS_TRITON:
        raise RuntimeError("MODIFY_KERNELS=triton but triton is not installed; pip install triton")
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before importing modify")
    return True


def _check(x: torch.Tensor, idx: torch.Tensor, length: int | None = None) -> None:
    if idx.dtype != torch.int64 or idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"idx must be [B, k] int64 with B = {x.shape[0]}, got {tuple(idx.shape)} {idx.dtype}")
    if idx.device != x.device:
        raise ValueError(f"idx is on {idx.device} but the hidden states are on {x.device}; move them together")
    if not x.dtype.is_floating_point:
        raise ValueError(f"routing ops take floating-point tensors, got {x.dtype}")
    if os.environ.get("MODIFY_DEBUG") == "1" and length is not None and idx.numel():
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= length:
            raise IndexError(f"token index out of range: indices span [{low}, {high}] for a sequence of {length}")


def _impl(name: str) -> Any:
    # Imported on first use: triton is optional, and TRITON_INTERPRET is read when its kernels are defined.
    return importlib.import_module(f"modify.kernels.{name}")


def _check_scatter(x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor) -> None:
    _check(x, idx, x.shape[1])
    if delta.shape != (*idx.shape, x.shape[2]) or gate.shape != idx.shape:
        raise ValueError(
            f"delta must be [B, k, D] = {(*idx.shape, x.shape[2])} and gate [B, k], got {tuple(delta.shape)} and {tuple(gate.shape)}"
        )
    if delta.dtype != x.dtype:
        raise ValueError(f"delta is {delta.dtype} but x is {x.dtype}; cast delta to the residual stream's dtype")


def _eager_reference(t: torch.Tensor) -> bool:
    """Whether a routing op may skip its custom op and run the reference directly: in eager mode where the
    reference is what the op would run anyway. A custom op's Python dispatch costs about 100 µs a call, as
    much as the op itself on CPU-sized tensors; the op earns it under torch.compile (one opaque node with a
    fake implementation) and where the Triton kernels run."""
    return not torch.compiler.is_compiling() and not _triton_for(t)


def route_gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """:func:`gather_tokens`, without the custom op's dispatch where :func:`_eager_reference` allows."""
    if _eager_reference(x) and x.dim() == 3:
        _check(x, idx, x.shape[1])
        return reference.gather_tokens(x, idx)
    return gather_tokens(x, idx)


def route_scatter_add(x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """:func:`gated_scatter_add`, without the custom op's dispatch where :func:`_eager_reference` allows."""
    if _eager_reference(x):
        _check_scatter(x, idx, delta, gate)
        return reference.gated_scatter_add(x, idx, delta, gate)
    return gated_scatter_add(x, idx, delta, gate)


@torch.library.custom_op("modify::gather_tokens", mutates_args=())
def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[B, T, D] hidden states, [B, k] sorted int64 positions -> [B, k, D] rows."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D], got shape {tuple(x.shape)}")
    _check(x, idx, x.shape[1])
    if _triton_for(x):
        return _impl("gather_tokens").gather_tokens_triton(x, idx)
    return reference.gather_tokens(x, idx).contiguous()


@gather_tokens.register_fake
def _(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], idx.shape[1], x.shape[2])


@torch.library.custom_op("modify::scatter_tokens", mutates_args=())
def scatter_tokens(src: torch.Tensor, idx: torch.Tensor, length: int) -> torch.Tensor:
    """The adjoint of gather_tokens: [B, k, D] rows at ``idx`` of a zero [B, length, D] tensor."""
    _check(src, idx, length)
    if _triton_for(src):
        return _impl("gated_scatter_add").scatter_tokens_triton(src, idx, length)
    return reference.scatter_tokens(src, idx, length)


@scatter_tokens.register_fake
def _(src: torch.Tensor, idx: torch.Tensor, length: int) -> torch.Tensor:
    return src.new_empty(src.shape[0], length, src.shape[2])


def _gather_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, idx = inputs
    ctx.save_for_backward(idx)
    ctx.length = x.shape[1]


def _gather_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    (idx,) = ctx.saved_tensors
    return scatter_tokens(grad.contiguous(), idx, ctx.length), None


def _scatter_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    _, idx, _ = inputs
    ctx.save_for_backward(idx)


def _scatter_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
    (idx,) = ctx.saved_tensors
    return gather_tokens(grad, idx), None, None


gather_tokens.register_autograd(_gather_backward, setup_context=_gather_setup)
scatter_tokens.register_autograd(_scatter_backward, setup_context=_scatter_setup)


@torch.library.custom_op("modify::gated_scatter_add", mutates_args=())
def gated_scatter_add(x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """out = x with out[b, idx[b, j]] += gate[b, j] · delta[b, j]; x [B, T, D], delta [B, k, D], gate [B, k]."""
    _check_scatter(x, idx, delta, gate)
    if _triton_for(x):
        return _impl("gated_scatter_add").gated_scatter_add_triton(x, idx, delta, gate)
    return reference.gated_scatter_add(x, idx, delta, gate)


@gated_scatter_add.register_fake
def _(x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("modify::gated_scatter_add_backward", mutates_args=())
def gated_scatter_add_backward(
    grad_out: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_delta, grad_gate) of gated_scatter_add in one pass over the routed rows of grad_out."""
    _check(grad_out, idx, grad_out.shape[1])
    if _triton_for(grad_out):
        return _impl("gated_scatter_add").gated_scatter_add_backward_triton(grad_out, idx, delta, gate)
    return reference.gated_scatter_add_backward(grad_out, idx, delta, gate)


@gated_scatter_add_backward.register_fake
def _(
    grad_out: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(delta), torch.empty_like(gate)


def _gsa_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    _, idx, delta, gate = inputs
    ctx.save_for_backward(idx, delta, gate)


def _gsa_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor | None, torch.Tensor | None]:
    idx, delta, gate = ctx.saved_tensors
    grad_delta = grad_gate = None
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        grad_delta, grad_gate = gated_scatter_add_backward(grad, idx, delta, gate)
    return grad, None, grad_delta, grad_gate


gated_scatter_add.register_autograd(_gsa_backward, setup_context=_gsa_setup)
