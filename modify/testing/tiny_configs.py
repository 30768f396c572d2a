"""Tiny random configs of any family transformers registers, built from the family's own config class.

The family's default config is shrunk field by field: every field named in :data:`TINY_SIZES` that the config
(or one of its sub-configs, such as a multimodal model's ``text_config``, or one layer's own settings) has is
set to a tiny value, lists with one entry per layer are cut to the new depth, and token ids are kept inside the
small vocabulary. What a family needs beyond that is data in :data:`ADJUSTMENTS`, never code per family; an
adjustment of a sub-config sets only the fields it names.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig

__all__ = ["TINY_SIZES", "ADJUSTMENTS", "tiny_config", "NUM_LAYERS"]

NUM_LAYERS = 4

#: Config field -> tiny value, set wherever a config has the field.
TINY_SIZES: dict[str, Any] = {
    # depth
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers"), NUM_LAYERS),
    # width
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "dim", "n_embed", "embed_dim", "word_embed_proj_dim"), 64),
    "hidden_size_global": 64,  # the width of the global model that local models (byte level) read and write
    # adapters between a multimodal model's encoders and its text model: encoder width in, text width out
    **dict.fromkeys(("adapter_in_dim", "adapter_input_size", "adapter_out_dim"), 64),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "decoder_ffn_dim", "ffn_hidden_size", "d_ff"), 128),
    # heads
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads"), 4),
    "num_key_value_heads": 2,
    **dict.fromkeys(("head_dim", "d_head", "attention_head_dim"), 16),
    "rotary_dim": 8,
    # latent attention (MLA)
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    # experts
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k"), 2),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"), 32),
    "expert_ffn_hidden_size": 32,
    "n_shared_experts": 1,
    **dict.fromkeys(("n_group", "num_expert_group"), 1),
    "topk_group": 1,
    # linear attention, state space
    **dict.fromkeys(("linear_key_head_dim", "linear_value_head_dim", "linear_head_dim", "mamba_headdim"), 16),
    "linear_num_key_heads": 2,
    **dict.fromkeys(("linear_num_value_heads", "linear_num_heads"), 4),
    **dict.fromkeys(("mamba_n_heads", "n_mamba_heads"), 8),
    "mamba_d_head": 16,
    **dict.fromkeys(("mamba_d_state", "ssm_state_size", "state_size"), 16),
    "mamba_d_ssm": 128,
    "num_kv_shared_layers": 0,
    # tables
    "vocab_size": 256,
    "vocab_size_per_layer_input": 256,  # Gemma3n and Gemma4's per-layer token embeddings
    "hidden_size_per_layer_input": 16,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx"), 256),
}

# query-selected attention (QSA): the attention layers' indexer (one key head) picks blocks of tokens within a
# budget; the default leaves its fields unset, which the attention cannot run. The rotary part of the attention
# heads must fit the indexer's heads, already in the full-size default the tiny config starts from.
_QWEN4_EXP_TEXT = {
    "head_dim": 16,
    "indexer_n_heads": 4,
    "indexer_kv_heads": 1,
    "indexer_head_dim": 16,
    "indexer_budget": 16,
    "indexer_compress_ratio": 4,
    "hc_lowrank": 16,
}

#: model_type -> config fields the family needs at tiny size (applied after :data:`TINY_SIZES`).
ADJUSTMENTS: dict[str, dict[str, Any]] = {
    # hybrids whose attention (or expert) layers come every few layers: one in every two at tiny depth
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    # hybrid layers share one transformer (tied across them, so at least two); widths the config derives itself
    "zamba": {
        "num_hidden_layers": NUM_LAYERS,
        "layers_block_type": ["linear_attention", "hybrid"] * (NUM_LAYERS // 2),
        "attention_hidden_size": None,
        "attention_head_dim": None,
        "mamba_dt_rank": "auto",
    },
    "lfm2_moe": {"num_hidden_layers": NUM_LAYERS, "layer_types": ["conv", "full_attention"] * (NUM_LAYERS // 2)},
    # input, recurrent and output sections; layer types given without the serialized "mlp" blocks, which halve
    "dory": {
        "num_hidden_layers": NUM_LAYERS,
        "n_input_layers": 1,
        "n_recurrent_layers": 2,
        "n_output_layers": 1,
        "layer_types": ["sliding_attention", "full_attention"] * (NUM_LAYERS // 2),
    },
    # sliding-window layers' heads are as wide as the latent-attention query/key (nope + rope)
    "dots3_note": {"text_config": {"head_dim": 16}},
    "dots3_note_text": {"head_dim": 16},
    # the hybrid layers' attention reads the hidden states concatenated with the embeddings: twice as wide (the
    # config derives these widths from the full-size default, and its own values would come back stale)
    "zamba2": {"attention_hidden_size": 128, "attention_head_dim": 32, "kv_channels": 16, "num_query_groups": 4},
    # the attention clips queries, keys and values and cannot run unclipped; grouped keys as in the checkpoints
    "dbrx": {"attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0}},
    "qwen4_exp": {"text_config": _QWEN4_EXP_TEXT},
    "qwen4_exp_text": _QWEN4_EXP_TEXT,
    # the default gives no rotary settings per layer type; as in Cohere2: three sliding-window layers with (text-only
    # multimodal) rotary embeddings, then a global layer without positions; sections of half the 16-wide heads
    "cohere_compass_text": {
        "num_hidden_layers": NUM_LAYERS,
        "layer_types": ["sliding_attention"] * (NUM_LAYERS - 1) + ["full_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 50000.0, "mrope_section": [4, 2, 2]},
            "full_attention": None,
        },
    },
    "blt": {"encoder_hash_byte_group_vocab": 512},  # hashed byte n-gram tables: 500002 rows each by default
    # feed-forward widths per layer (a list), LAuReL rank
    "gemma3n_text": {"intermediate_size": 128, "laurel_rank": 16},
    "zaya": {"num_experts_per_tok": 1},  # the family's only supported value
    "reformer": {
        "is_decoder": True,
        "axial_pos_shape": [16, 16],
        "axial_pos_embds_dim": [32, 32],
        "local_attn_chunk_length": 8,
        "lsh_attn_chunk_length": 8,
    },
    "gemma4_assistant": {
        "hidden_size_per_layer_input": 0,
        "text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0},
    },
}

_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id")
_DEPTH_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _depth(values: dict[str, Any]) -> int | None:
    return next((values[k] for k in _DEPTH_FIELDS if isinstance(values.get(k), int)), None)


def _is_per_layer(value: Any) -> bool:
    """Per-layer settings (``per_layer_config``): layer index -> the fields that layer sets (not ``id2label``)."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(str(i).isdigit() and isinstance(v, dict) for i, v in value.items())
    )


def _keep_layers(out: dict[str, Any], old: int, new: int) -> None:
    """Cut per-layer fields to ``new`` layers, keeping one layer of each kind the family mixes (sliding and
    full attention, linear-attention and attention layers, layers with settings of their own) first."""
    lists = [k for k, v in out.items() if isinstance(v, list) and len(v) == old]
    index_lists = [
        k
        for k, v in out.items()
        if isinstance(v, list)
        and k not in lists
        and "layer" in k
        and v
        and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
    ]
    overrides = {k: {int(i): v for i, v in out[k].items()} for k, v in out.items() if _is_per_layer(v)}

    def kind(i: int) -> str:
        return repr(
            ([out[k][i] for k in lists], [i in out[k] for k in index_lists], [o.get(i) for o in overrides.values()])
        )

    firsts: dict[str, int] = {}
    for i in range(old):
        firsts.setdefault(kind(i), i)
    picked = sorted(firsts.values())[:new]
    picked = sorted(picked + [i for i in range(old) if i not in picked][: new - len(picked)])
    for k in lists:
        out[k] = [out[k][i] for i in picked]
    for k in index_lists:
        out[k] = [j for j, i in enumerate(picked) if i in out[k]]
    for k, values in overrides.items():
        out[k] = {str(j): values[i] for j, i in enumerate(picked) if i in values}


def _sizes(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for key, tiny in TINY_SIZES.items():
        if key in out and (out[key] is None or isinstance(out[key], int)) and not isinstance(out[key], bool):
            out[key] = tiny
    return out


def _shrink_layer(out: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """A layer's own settings (``per_layer_config``) shrunk like the config's: tiny sizes, latent keys per head."""
    layer = _sizes(layer)
    if isinstance({**out, **layer}.get("kv_lora_rank"), int) and "num_key_value_heads" in layer:
        layer["num_key_value_heads"] = layer.get("num_attention_heads", out.get("num_attention_heads"))
    return layer


def _shrink(values: dict[str, Any]) -> dict[str, Any]:
    old = _depth(values)
    out = _sizes(values)
    for key, value in list(out.items()):
        if _is_per_layer(value):
            out[key] = {i: _shrink_layer(out, v) for i, v in value.items()}
        elif isinstance(value, dict) and ("model_type" in value or key.endswith("_config")):
            out[key] = _shrink(value)
    new = _depth(out)
    if old and new and old > new:
        _keep_layers(out, old, new)
    if isinstance(out.get("kv_lora_rank"), int) and "num_key_value_heads" in out:
        out["num_key_value_heads"] = out.get("num_attention_heads")  # latent attention: keys per head
    if isinstance(out.get("qk_rope_head_dim"), int) and isinstance(out.get("qk_nope_head_dim"), int):
        # latent attention: rotary tables are built for the rotary part; queries and keys are both parts
        if "head_dim" in out:
            out["head_dim"] = out["qk_rope_head_dim"]
        if "qk_head_dim" in out:
            out["qk_head_dim"] = out["qk_rope_head_dim"] + out["qk_nope_head_dim"]
    vocab = out.get("vocab_size")
    if isinstance(vocab, int):
        for key in _TOKEN_ID_FIELDS:
            token = out.get(key)
            if isinstance(token, int) and token >= vocab:
                out[key] = min(token, vocab - 1) if key != "pad_token_id" else 0
            elif isinstance(token, list):
                out[key] = [t if t < vocab else vocab - 1 for t in token]
    return out


def _merge(values: dict[str, Any], adjust: dict[str, Any]) -> dict[str, Any]:
    """``values`` with ``adjust`` applied; an adjustment of a sub-config (a dict) sets only the fields it names."""
    out = dict(values)
    for key, value in adjust.items():
        here = out.get(key)
        if isinstance(value, dict) and isinstance(here, dict) and not _is_per_layer(here) and not _is_per_layer(value):
            out[key] = _merge(here, value)
        else:
            out[key] = value
    return out


def tiny_config(model_type: str, **overrides: Any):  # type: ignore[no-untyped-def]
    """The default config of ``model_type`` shrunk to a tiny model of :data:`NUM_LAYERS` blocks."""
    adjust = ADJUSTMENTS.get(model_type, {})
    default = AutoConfig.for_model(model_type, **adjust)
    values = _merge(_merge(_shrink(default.to_dict()), adjust), overrides)
    values.pop("model_type", None)
    values.pop("transformers_version", None)
    return type(default).from_dict(values)
