"""What ``modify`` knows about particular architectures, kept as data.

Block discovery, tracing and residual analysis are generic; these tables only speed them up or name things
that can't be inferred. Add an entry here, never a copy of a model's code.
"""

from __future__ import annotations

import re

__all__ = [
    "BLOCK_STACKS",
    "MOE_PARTS",
    "NORM_CLASS_PATTERN",
    "TESTED_FAMILIES",
    "ROUTABLE_ATTENTION",
    "UNROUTABLE_ATTENTION",
    "attention_refusal",
    "UNROUTABLE_FAMILIES",
]

#: model_type -> qualified name of the module list holding the transformer blocks. A hint: a model type
#: not listed is searched for its largest list of blocks that run on token ids.
BLOCK_STACKS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gemma2": "model.layers",
    "phi": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
}

#: Module classes whose name matches this are normalisation layers (LlamaRMSNorm, LayerNorm, Gemma2RMSNorm...).
NORM_CLASS_PATTERN = re.compile(r"(Layer|RMS|Group|Batch)?Norm(\d*d)?$")

#: model_type -> the block form the tests found for it (the README's support table is generated from tests).
TESTED_FAMILIES: dict[str, str] = {
    "llama": "pre-norm",
    "mistral": "pre-norm",
    "qwen2": "pre-norm",
    "gemma2": "sandwich",
    "phi": "parallel",
    "gpt2": "pre-norm",
    "gpt_neox": "parallel",
    "opt": "pre-norm",
}

#: Child names of a Hugging Face Mixture-of-Experts layer: its router (called on [tokens, hidden], returning
#: (logits, top-k weights, top-k experts)) and its experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, and more).
MOE_PARTS: tuple[str, str] = ("gate", "experts")

#: model_type -> why its blocks can't be routed, for what the generic passes can't see.
UNROUTABLE_FAMILIES: dict[str, str] = {}

#: Hugging Face attention implementations routing is tested with (tests/test_packed.py, tests/generate/).
ROUTABLE_ATTENTION = ("eager", "sdpa")
#: Attention implementations (a name, or a prefix of one) whose masks can't follow the routed tokens, and why.
#: A gathered subsequence keeps its document boundaries and skipped positions only in the 4-D mask gathered
#: with it, so an implementation must honour that mask; eager and sdpa do (tests/test_loading.py refuses
#: the rest).
UNROUTABLE_ATTENTION: dict[str, str] = {
    "flex_attention": "flex attention's BlockMask is built for the full sequence and can't be gathered",
    "flash_attention": (
        "flash attention takes no 4-D mask: it finds packed documents where position ids restart, which a "
        "gathered subsequence loses when a document's first token is skipped, and in cached decoding it would "
        "attend to the zero keys cached at skipped positions"
    ),
    "paged|": "paged attention (continuous batching) keeps its own block cache, which routing doesn't fill",
}


def attention_refusal(config: object) -> str:
    """Why routing can't run with the attention implementation ``config`` (and its text config) selects, with
    the fix; "" when it can (eager, sdpa, or a config that names none)."""
    text = getattr(config, "get_text_config", lambda: None)() if config is not None else None
    for cfg in (config, text):
        name = getattr(cfg, "_attn_implementation", None)
        if name is None or name in ROUTABLE_ATTENTION:
            continue
        reason = next((r for key, r in UNROUTABLE_ATTENTION.items() if name.startswith(key)), None)
        reason = reason or "it is not one modify has tested with routing (eager, sdpa)"
        fix = "load the model with attn_implementation='sdpa' or 'eager'"
        return f"attention implementation {name!r} can't be routed: {reason}; {fix}"
    return ""
