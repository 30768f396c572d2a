"""The arguments of a routed block's call: what it is called with, read and gathered for the selected tokens.

A block is called with the hidden states and every per-token argument the model computed for them (rotary
tables, position ids, the 4-D attention mask on both token axes, ALiBi biases, a cache). :class:`BlockCall`
binds one call and reads off it what routing needs (the hidden states, the mask, padding, the cache);
:func:`gather_value` gathers any argument for the selected tokens, along the token dimensions the probe found
(:mod:`modify.passes.probe_block_calls`). Positions stay the original ones: they are gathered, not renumbered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from modify.kernels import gather_token_dim
from modify.passes.probe_block_calls import BlockCallSpec, Path

__all__ = [
    "BlockCall",
    "find_cache",
    "padding_from_mask",
    "block_padding",
    "recent_padding",
    "mask_allows",
    "pairwise_mask",
    "gather_value",
    "replace_at",
]


def find_cache(named: dict[str, Any]) -> tuple[str, Any] | None:
    """The (argument name, cache) of a block call that carries a Hugging Face cache, else None."""
    # optional dependency: transformers; a plain torch model has no cache to follow
    try:
        from transformers.cache_utils import Cache
    except ImportError:
        return None

    return next(((k, v) for k, v in named.items() if isinstance(v, Cache)), None)


@dataclass
class BlockCall:
    """One call of a routed block, bound to the block's signature.

    Attributes:
        named: every argument by name.
        x: the hidden states [B, T, D].
        mask: the 4-D attention mask, or None.
        padding: [B, T] bool, True at padding, or None when nothing tells.
        cache: (argument name, cache) when the call carries a Hugging Face cache, else None.
    """

    named: dict[str, Any]
    x: torch.Tensor
    mask: torch.Tensor | None
    padding: torch.Tensor | None
    cache: tuple[str, Any] | None

    @classmethod
    def bind(cls, named: dict[str, Any], spec: BlockCallSpec, input_padding: torch.Tensor | None) -> BlockCall:
        """``input_padding``: the model's own [B, P + T] padding, for blocks that get no mask of their own."""
        x = named[spec.hidden]
        batch, length, _ = x.shape
        mask = pairwise_mask(named, spec)
        padding = block_padding(named, spec, mask, batch, length)
        if padding is None:
            padding = recent_padding(input_padding, batch, length)
        return cls(named, x, mask, padding, find_cache(named))

    def real(self) -> torch.Tensor:
        """[B, T] bool, True at real (not padding) tokens."""
        if self.padding is not None:
            return ~self.padding
        return torch.ones(self.x.shape[:2], dtype=torch.bool, device=self.x.device)


def padding_from_mask(mask: torch.Tensor, batch: int, past: int | None = None) -> torch.Tensor:
    """[B, T] bool, True where a token is padding, read from a [B|1, H|1, T, T + P] attention mask.

    A real token always attends to itself; Hugging Face masks a padding key in every row, its own
    included. So the diagonal tells padding apart whatever causal, sliding-window or chunked pattern the
    mask also carries. With P cached positions before the T tokens, their own keys are columns P to P + T: the
    last T columns, unless the cache has a fixed length (static), where ``past`` gives P.
    """
    offset = mask.shape[-1] - mask.shape[-2] if past is None else past
    diag = mask.diagonal(offset=offset, dim1=-2, dim2=-1)[:, 0]
    return (~mask_allows(diag)).expand(batch, diag.shape[-1])


def block_padding(
    named: dict[str, Any], spec: BlockCallSpec, mask: torch.Tensor | None, batch: int, length: int
) -> torch.Tensor | None:
    """[B, T] bool, True at padding, for a block call: from its 4-D attention mask ``mask`` if it has one,
    else from the padding mask the probe found (hybrid models pass their linear-attention and state-space
    layers only that), else None."""
    if mask is not None:
        return padding_from_mask(~mask if spec.mask_blocks_true else mask, batch)
    if spec.padding_mask is None:
        return None
    leaf: Any = named.get(spec.padding_mask[0])
    for i in spec.padding_mask[1:]:
        leaf = leaf[i] if leaf is not None else None
    if not torch.is_tensor(leaf) or leaf.dim() < 2:
        return None
    rows = leaf.reshape(leaf.shape[0], -1)[:, -length:]  # [B, T]; with a cache, the last T of P + T keys
    pad = rows.bool() if spec.padding_value == "true" else rows < 0 if spec.padding_value == "negative" else rows == 0
    return pad.expand(batch, length)


def recent_padding(padding: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """[B, T] of a [B|1, P + T] padding mask (the model's ``attention_mask`` with P cached positions), or None."""
    if padding is None or padding.shape[-1] < length:
        return None
    return padding[:, -length:].expand(batch, length)


def mask_allows(mask: torch.Tensor) -> torch.Tensor:
    """A Hugging Face attention mask as bool, True where attention is allowed: a bool mask as it is, an
    additive one where it is above half its dtype's minimum (what it adds to the scores there is 0)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def pairwise_mask(named: dict[str, Any], spec: BlockCallSpec) -> torch.Tensor | None:
    """The 4-D attention mask of a block call (the argument the probe found indexed by token pairs), or None."""
    if spec.pairwise is None:
        return None
    mask: Any = named.get(spec.pairwise[0])
    for i in spec.pairwise[1:]:
        mask = mask[i] if mask is not None else None
    return mask if torch.is_tensor(mask) and mask.dim() == 4 else None


def _gather_leaf(leaf: Any, path: Path, dims: tuple[int, ...] | None, idx: torch.Tensor, length: int) -> Any:
    if not torch.is_tensor(leaf):
        return leaf
    if dims is None:
        # Not seen while probing: gather every non-batch dimension that has the sequence's length.
        dims = tuple(d for d in range(leaf.dim()) if leaf.shape[d] == length and (d > 0 or leaf.dim() == 1))
    if not dims:
        return leaf
    if 0 in dims:
        if idx.shape[0] != 1 and not bool((idx == idx[:1]).all()):
            raise ValueError(
                f"argument {'.'.join(map(str, path))} has tokens but no batch dimension, so it can't follow "
                "per-sequence routing; use batch size 1 or pass it per sequence"
            )
        leaf = leaf.unsqueeze(0)
        dims = tuple(d + 1 for d in dims)
        for d in dims:
            leaf = gather_token_dim(leaf, idx[:1], d)
        return leaf.squeeze(0)
    batch = idx.shape[0]
    if leaf.shape[0] != batch and leaf.shape[0] % batch == 0:
        # The batch folded with heads, [B·H, ...] (BLOOM's ALiBi bias): gather per sequence, fold back.
        folded = leaf.reshape(batch, leaf.shape[0] // batch, *leaf.shape[1:])
        for d in dims:
            folded = gather_token_dim(folded, idx, d + 1)
        return folded.reshape(-1, *folded.shape[2:])
    for d in dims:
        leaf = gather_token_dim(leaf, idx, d)
    return leaf


def gather_value(value: Any, path: Path, spec: BlockCallSpec, idx: torch.Tensor, length: int) -> Any:
    if isinstance(value, (tuple, list)):
        items = [gather_value(v, (*path, i), spec, idx, length) for i, v in enumerate(value)]
        return type(value)(items)
    if type(value) is dict and all(isinstance(k, str) for k in value):
        return {k: gather_value(v, (*path, k), spec, idx, length) for k, v in value.items()}
    return _gather_leaf(value, path, spec.token_dims.get(path), idx, length)


def replace_at(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    """``value`` with the leaf at ``path`` (indices into nested tuples and lists) replaced by ``new``."""
    if not path:
        return new
    items = list(value)
    items[path[0]] = replace_at(items[path[0]], path[1:], new)
    return type(value)(items)
