"""Tiny random-weight models of the families ``modify`` is tested on (no hub access needed)."""

from __future__ import annotations

import string
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from torch import nn
from transformers import PreTrainedTokenizerFast

__all__ = ["FAMILIES", "tiny_model", "tiny_tokenizer"]

_COMMON = {"vocab_size": 97, "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

_DECODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4}
_GQA = {**_DECODER, "num_key_value_heads": 2}

#: family -> (config class name in transformers, keyword arguments). Four blocks each, small widths.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", _GQA),
    "mistral": ("MistralConfig", {**_GQA, "sliding_window": 8}),
    "qwen2": ("Qwen2Config", _GQA),
    "gemma2": ("Gemma2Config", {**_GQA, "head_dim": 8, "sliding_window": 8}),
    "phi": ("PhiConfig", _DECODER),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 128}),
    "gpt_neox": ("GPTNeoXConfig", _DECODER),
    "opt": (
        "OPTConfig",
        {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "word_embed_proj_dim": 32},
    ),
}


def tiny_model(family: str, seed: int = 0, attn_implementation: str = "eager", **overrides: Any) -> nn.Module:
    """A randomly initialised ``AutoModelForCausalLM`` of ``family`` in eval mode, float32.

    Eager attention by default: FlopCounterMode counts its matmuls, and it takes every mask form.
    """
    config_name, kwargs = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**_COMMON, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    # Random init leaves some norms at exactly 1 and biases at 0; perturb every parameter so that a wrong
    # wiring (a norm skipped, a bias dropped) shows in the outputs.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def tiny_tokenizer(vocab_size: int = 97):  # type: ignore[no-untyped-def]
    """A character-level fast tokenizer over printable ASCII, ids below ``vocab_size``, unknown -> 0."""
    chars = [c for c in string.printable if c not in "\x0b\x0c"][: vocab_size - 1]
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
