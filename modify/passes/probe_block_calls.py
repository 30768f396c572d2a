"""Learn how the parent model calls each block, by running it on two tiny inputs.

A block's forward takes, beside the hidden states, whatever its parent passes: rotary tables, position ids,
4-D attention masks, caches, flags. Which of those hold one entry per token is not in any signature, so
this step runs the model on random token ids at two sequence lengths (13 and 17, chosen to differ from
every batch, head or hidden size a model might have) with forward pre-hooks on the blocks, and marks as
a *token dimension* every dimension of every tensor argument whose size follows the sequence length.
The routed block gathers exactly those dimensions with the selected tokens.

It runs the model under ``torch.no_grad`` in eval mode and restores each module's training flag; it
changes no weights and draws no numbers from the global random generator.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modify.errors import UnsupportedModelError
from modify.passes.capture_block import CallStructure, call_structure

__all__ = [
    "BlockCallSpec",
    "probe_block_calls",
    "bind_call",
    "flatten_leaves",
    "vocab_size",
    "random_token_ids",
    "PROBE_LENGTHS",
]

PROBE_LENGTHS = (13, 17)
_PROBE_BATCH = 2

Path = tuple[Any, ...]


@dataclass
class BlockCallSpec:
    """How a block is called.

    Attributes:
        hidden: name of the hidden-states argument.
        token_dims: leaf path -> dimensions of that tensor that index tokens. A path is the argument name
            followed by tuple positions, e.g. ``("position_embeddings", 0)`` for the cosine table.
        output_is_tuple: the block returns a tuple (or list) whose first element is the hidden states.
        hidden_size: last dimension of the hidden states.
        structure: the structure of the probe's call, for capturing the block as its parent calls it.
        structures: every call structure the probe saw, ``structure`` first: with the default inputs also
            the plain ``model(input_ids)`` call (a cache, no padding mask), so that a converted model can
            capture its Δ graphs for both before its first call (``torch.compile`` can't trace a capture).
        padding_mask: path of a padding mask argument indexed by batch and tokens only ([B, T] or [B, 1, 1, T]),
            if the block gets one: hybrid models give their linear-attention and state-space layers that
            instead of a 4-D mask, GPT-1 gets nothing else.
        padding_value: which entries of ``padding_mask`` are padding: "zero" (1 real, 0 padding), "true"
            (bool, True at padding) or "negative" (additive: 0 real, a large negative number at padding).
        child_nones: module name (relative to the block) -> which places of the tuple the module returned
            were None, for modules whose tuples held a None: tracing gives the block's code those Nones.
        runs: False for a block the probe's forwards never called (Mllama's cross-attention layers, which run
            only with image inputs); nothing else is known of it.
        mask_blocks_true: the 4-D mask is bool with True where attention is blocked (MPT), the reverse of
            Hugging Face's usual convention.
        position_tables: paths of arguments that hold a table over the model's maximum number of positions
            rather than this sequence's tokens (MPT's ALiBi biases over ``max_seq_len``): the block takes its own
            rows of it by the sequence's length, which routed tokens' original positions would not follow.
        examples: the graph inputs of one probe call of each structure in ``structures`` (detached), for
            captures that read lengths off real values (:mod:`modify.passes.trace_attention`).
    """

    hidden: str
    token_dims: dict[Path, tuple[int, ...]] = field(default_factory=dict)
    output_is_tuple: bool = False
    hidden_size: int = 0
    structure: CallStructure | None = None
    structures: tuple[CallStructure, ...] = ()
    padding_mask: Path | None = None
    padding_value: str = "zero"
    child_nones: dict[str, tuple[bool, ...]] = field(default_factory=dict)
    runs: bool = True
    mask_blocks_true: bool = False
    position_tables: tuple[Path, ...] = ()
    examples: dict[CallStructure, list[Any]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def pairwise(self) -> Path | None:
        """Path of the first argument indexed by token pairs (the attention mask), if any."""
        return next((p for p, dims in self.token_dims.items() if len(dims) == 2), None)


def bind_call(signature: inspect.Signature, block: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Name every argument of a call to ``block``; keyword arguments collected by ``**kwargs`` come last."""
    bound = signature.bind(block, *args, **kwargs).arguments
    named: dict[str, Any] = {}
    for i, (name, value) in enumerate(bound.items()):
        if i == 0:
            continue  # self
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise UnsupportedModelError(type(block).__name__, f"its forward takes *{name}, which can't be routed")
        else:
            named[name] = value
    return named


def flatten_leaves(value: Any, path: Path) -> Iterator[tuple[Path, Any]]:
    """Yield ``(path, leaf)`` for every leaf of nested tuples, lists and dicts with string keys."""
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from flatten_leaves(item, (*path, i))
    elif type(value) is dict and all(isinstance(k, str) for k in value):
        for key, item in value.items():
            yield from flatten_leaves(item, (*path, key))
    else:
        yield path, value


def vocab_size(model: nn.Module) -> int | None:
    """The vocabulary size of the model's language model (``text_config`` in multimodal configs), if any."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None)


def random_token_ids(model: nn.Module, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, length] random token ids on the model's device, from its vocabulary.

    Raises:
        UnsupportedModelError: the model has no vocabulary size to draw from.
    """
    vocab = vocab_size(model)
    if not vocab:
        raise UnsupportedModelError(
            type(model).__name__,
            "it has no config.vocab_size to build inputs from; pass example_inputs=lambda T: {...}",
        )
    return torch.randint(0, vocab, (batch, length), generator=generator).to(input_device(model))


def input_device(model: nn.Module) -> torch.device:
    """Where the model's token ids go: its input embedding's device. Under accelerate's offload the weights
    are on ``meta`` until a hook loads them, so the device is the hook's execution device (the embedding's,
    else the model's); failing both, the first parameter with data, else the CPU, from which the hooks move
    inputs to where they run."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    weight = getattr(embedding, "weight", None)
    if isinstance(weight, torch.Tensor) and not weight.is_meta:
        return weight.device
    for module in (embedding, model):
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # SequentialHook's chain
            device = getattr(h, "execution_device", None)
            if device is not None:
                return torch.device(device)
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


def _default_inputs(model: nn.Module, length: int, generator: torch.Generator) -> dict[str, Any]:
    ids = random_token_ids(model, _PROBE_BATCH, length, generator)
    # One padded token, so that the attention mask is materialised (SDPA passes None without padding).
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "use_cache": False}


def probe_block_calls(
    model: nn.Module,
    blocks: list[nn.Module],
    example_inputs: Callable[[int], dict[str, Any]] | None = None,
) -> list[BlockCallSpec]:
    """Run ``model`` twice (three times with the default inputs) and return how each of ``blocks`` is called.

    Args:
        model: the whole model, called as ``model(**example_inputs(T))``.
        blocks: the blocks to observe.
        example_inputs: builds the model's keyword inputs for a batch of sequences of length T; by default
            random token ids of batch 2.
    """
    generator = torch.Generator().manual_seed(0)
    calls: list[list[tuple[dict[str, Any], Any]]] = [[] for _ in blocks]
    nones: list[dict[str, tuple[bool, ...]]] = [{} for _ in blocks]
    handles = []
    for i, block in enumerate(blocks):
        sig = inspect.signature(type(block).forward)

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict, i: int = i, sig: inspect.Signature = sig) -> None:
            calls[i].append((bind_call(sig, mod, args, kwargs), None))

        def post_hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any, i: int = i) -> None:
            named, _ = calls[i][-1]
            calls[i][-1] = (named, out)

        handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook, with_kwargs=True))
        for name, child in block.named_modules():
            if child is not block:

                def child_hook(mod: nn.Module, args: Any, out: Any, i: int = i, name: str = name) -> None:
                    if isinstance(out, (tuple, list)) and any(o is None for o in out):
                        nones[i].setdefault(name, tuple(o is None for o in out))

                handles.append(child.register_forward_hook(child_hook))
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            for length in PROBE_LENGTHS:
                inputs = example_inputs(length) if example_inputs else _default_inputs(model, length, generator)
                model(**inputs)
            plain: list[CallStructure | None] = [None] * len(blocks)
            plain_examples: list[list[Any] | None] = [None] * len(blocks)
            if example_inputs is None:
                # How most callers call a causal LM: no mask, the config's use_cache. Only its structure is kept.
                ids = _default_inputs(model, PROBE_LENGTHS[-1], generator)["input_ids"]
                marks = [len(c) for c in calls]
                try:
                    model(input_ids=ids)
                except Exception:  # an optimisation only: a model that needs more inputs is probed as before
                    pass
                plain_calls = [call_structure(c[m][0], False) if len(c) > m else None for c, m in zip(calls, marks)]
                plain = [p[0] if p is not None else None for p in plain_calls]
                plain_examples = [p[1] if p is not None else None for p in plain_calls]
                for c, m in zip(calls, marks):
                    del c[m:]
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    limits = _position_limits(model)
    specs = [_spec_from_calls(type(b).__name__, c, limits) for b, c in zip(blocks, calls)]
    for spec, found in zip(specs, nones):
        spec.child_nones = found
    for spec, extra, example in zip(specs, plain, plain_examples):
        if not spec.runs:
            continue
        if extra is not None and example is not None:
            spec.examples.setdefault(extra, example)
        assert spec.structure is not None
        spec.structures = (spec.structure,) + ((extra,) if extra is not None and extra != spec.structure else ())
    return specs


#: Config fields that give a model's maximum number of positions.
_POSITION_LIMIT_FIELDS = ("max_position_embeddings", "max_seq_len", "n_positions", "max_sequence_length")


def _position_limits(model: nn.Module) -> set[int]:
    config = getattr(model, "config", None)
    configs = [config, getattr(config, "get_text_config", lambda: None)()] if config is not None else []
    return {
        v
        for cfg in configs
        for key in _POSITION_LIMIT_FIELDS
        if isinstance(v := getattr(cfg, key, None), int) and v > PROBE_LENGTHS[-1]
    }


def _spec_from_calls(name: str, calls: list[tuple[dict[str, Any], Any]], limits: Collection[int] = ()) -> BlockCallSpec:
    if not calls:
        return BlockCallSpec(hidden="", runs=False)
    if len(calls) != len(PROBE_LENGTHS):
        raise UnsupportedModelError(
            name,
            f"it was called {len(calls)} times in {len(PROBE_LENGTHS)} forward passes; "
            "routed blocks must run once per forward",
        )
    (first, out), (second, out2) = calls
    hidden = next(iter(first))
    x = first[hidden]
    if not torch.is_tensor(x) or x.dim() != 3 or x.shape[1] != PROBE_LENGTHS[0]:
        shape = list(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise UnsupportedModelError(
            name,
            f"its first argument '{hidden}' ({shape} for {PROBE_LENGTHS[0]} tokens) is not [batch, tokens, hidden] "
            "hidden states: several residual streams, or tokens on another axis, can't be routed",
        )
    leaves2 = {p: v for k, v in second.items() for p, v in flatten_leaves(v, (k,))}
    token_dims: dict[Path, tuple[int, ...]] = {}
    tables: list[Path] = []
    for key, value in first.items():
        for path, leaf in flatten_leaves(value, (key,)):
            other = leaves2.get(path)
            if not (torch.is_tensor(leaf) and torch.is_tensor(other) and leaf.dim() == other.dim()):
                continue
            dims = tuple(
                d for d in range(leaf.dim()) if leaf.shape[d] == PROBE_LENGTHS[0] and other.shape[d] == PROBE_LENGTHS[1]
            )
            if dims:
                token_dims[path] = dims
            elif any(leaf.shape[d] == other.shape[d] and leaf.shape[d] in limits for d in range(leaf.dim())):
                tables.append(path)
    padding_mask, padding_value = next(
        ((p, v) for p, dims in token_dims.items() if (v := _padding_convention(first, p, dims)) is not None),
        (None, "zero"),
    )
    pairwise = next((p for p, dims in token_dims.items() if len(dims) == 2), None)
    blocks_true = False
    if pairwise is not None:
        mask = dict(flatten_leaves(first[pairwise[0]], (pairwise[0],)))[pairwise]
        # Row 1 of the probe is all real tokens, and a real token always attends to itself.
        blocks_true = bool(mask.dtype == torch.bool and mask.dim() == 4 and not mask[-1, 0, -1, -1])
    if isinstance(out, (tuple, list)) and isinstance(out2, (tuple, list)):
        for i, (a, b) in enumerate(zip(out[1:], out2[1:]), start=1):
            # [batch, tokens, width] like the hidden states: a stream (attention weights have two token axes)
            if torch.is_tensor(a) and torch.is_tensor(b) and a.dim() == b.dim() == 3:
                if a.shape[1] == PROBE_LENGTHS[0] and b.shape[1] == PROBE_LENGTHS[1] and a.shape[2] == b.shape[2]:
                    raise UnsupportedModelError(
                        name,
                        f"it returns a per-token tensor beside the hidden states (output {i}), a second stream "
                        "that the tokens it skips would not carry on",
                    )
    out_tensor = out[0] if isinstance(out, (tuple, list)) else out
    if not torch.is_tensor(out_tensor) or out_tensor.shape != x.shape:
        raise UnsupportedModelError(name, "it does not return hidden states of its input's shape")
    structure, leaves = call_structure(second, training=False)
    return BlockCallSpec(
        examples={structure: leaves},
        hidden=hidden,
        token_dims=token_dims,
        output_is_tuple=isinstance(out, (tuple, list)),
        hidden_size=x.shape[-1],
        structure=structure,
        padding_mask=padding_mask,
        padding_value=padding_value,
        mask_blocks_true=blocks_true,
        position_tables=tuple(tables),
    )


def _padding_convention(named: dict[str, Any], path: Path, dims: tuple[int, ...]) -> str | None:
    """How a [B, T] or [B, 1, ..., T] argument marks the probe's one padded token (row 0, first position),
    or None if it is not a padding mask."""
    leaf = dict(flatten_leaves(named[path[0]], (path[0],)))[path]
    if dims != (leaf.dim() - 1,) or leaf.dim() < 2 or leaf.shape[0] != _PROBE_BATCH or leaf.is_complex():
        return None
    if any(s != 1 for s in leaf.shape[1:-1]):
        return None
    rows = leaf.reshape(_PROBE_BATCH, -1)
    pad, real = rows[0, 0], rows[1]
    if not (rows[0, 1:] == real[0]).all() or not (real == real[0]).all():
        return None
    if leaf.dtype == torch.bool:
        return "true" if bool(pad) else "zero"
    if pad == 0 and real[0] == 1:
        return "zero"
    if pad < 0 and real[0] == 0:
        return "negative"
    return None
