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
    "ATTENTION_REGISTRY",
    "EAGER_ATTENTION_FUNCTION",
    "ATTENTION_ROLES",
    "ATTENTION_PER_QUERY_ARGUMENTS",
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

#: Config fields from which a family decides a layer's kind by the layer's index, and how deleting blocks
#: renumbers them (``modify.remove_blocks``): (rule, the field it goes with). A list of one entry per layer
#: needs no entry; a field that no rule renumbers is found by rebuilding the layers from the new config.
#:   indices: a list of layer indices (Llama 4's moe_layers is one even when it is as long as the depth)
#:   below: the layers before this index are of one kind; through: the layers up to it, inclusive
#:   sparse step: Qwen-MoE's rule, sparse when (i + 1) % step == 0 and i is not in the partner list
#:   period: Jamba's rule, i % period == the partner (the offset)
#:   runs: GPT-Neo's [[kinds], repeat] runs, which the partner (one entry per layer) expands
LAYER_INDEX_FIELDS: dict[str, tuple[str, str]] = {
    "moe_layers": ("indices", ""),
    "mlp_only_layers": ("indices", ""),
    "cross_attention_layers": ("indices", ""),
    "first_k_dense_replace": ("below", ""),
    "num_dense_layers": ("below", ""),
    "moe_layer_start_index": ("below", ""),
    "moe_layer_end_index": ("through", ""),
    "decoder_sparse_step": ("sparse step", "mlp_only_layers"),
    "attn_layer_period": ("period", "attn_layer_offset"),
    "expert_layer_period": ("period", "expert_layer_offset"),
    "attention_types": ("runs", "attention_layers"),
}

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


#: Where transformers keeps its attention functions by implementation name (the registry a modeling file's
#: attention looks its function up in); tracing into attention keeps each of them as one call.
ATTENTION_REGISTRY = "transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS"
#: The modeling files' own eager attention function, the registry lookup's default.
EAGER_ATTENTION_FUNCTION = "eager_attention_forward"
#: The parameters of a transformers attention function that split attention reads: its query, keys, values
#: and mask, by name in the function's signature.
ATTENTION_ROLES: tuple[str, str, str, str] = ("query", "key", "value", "attention_mask")
#: Arguments an attention function may get that index tokens only along the query axis, so the query side
#: takes them gathered with the routed tokens (eager and sdpa ignore position ids; flash, which reads them,
#: is refused for routing).
ATTENTION_PER_QUERY_ARGUMENTS = ("position_ids",)
