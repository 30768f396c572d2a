"""Tiny random configs of any family transformers registers, built from the family's own config class.

The family's default config is shrunk field by field: every field named in :data:`TINY_SIZES` that the config
(or one of its sub-configs, such as a multimodal model's ``text_config``) has is set to a tiny value, lists
with one entry per layer are cut to the new depth, and token ids are kept inside the small vocabulary.
What a family needs beyond that is data in :data:`ADJUSTMENTS`, never code per family.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TINY_SIZES", "ADJUSTMENTS", "tiny_config", "NUM_LAYERS"]

NUM_LAYERS = 4

#: Config field -> tiny value, set wherever a config has the field.
TINY_SIZES: dict[str, Any] = {
    # depth
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers"), NUM_LAYERS),
    # width
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "dim", "n_embed", "embed_dim", "word_embed_proj_dim"), 64),
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
    "n_group": 1,
    "topk_group": 1,
    # linear attention, state space
    **dict.fromkeys(("linear_key_head_dim", "linear_value_head_dim", "linear_head_dim", "mamba_headdim"), 16),
    "linear_num_key_heads": 2,
    **dict.fromkeys(("linear_num_value_heads", "linear_num_heads"), 4),
    **dict.fromkeys(("mamba_n_heads", "n_mamba_heads"), 8),
    "mamba_d_head": 16,
    **dict.fromkeys(("mamba_d_state", "ssm_state_size", "state_size"), 16),
    "mamba_d_ssm": 64,
    "num_kv_shared_layers": 0,
    # tables
    "vocab_size": 256,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx"), 256),
}

#: model_type -> config fields the family needs at tiny size (applied after :data:`TINY_SIZES`).
ADJUSTMENTS: dict[str, dict[str, Any]] = {
    # hybrids whose attention (or expert) layers come every few layers: one in every two at tiny depth
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "zamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    "dory": {"n_input_layers": 1, "n_recurrent_layers": 2, "n_output_layers": 1},
    "zaya": {"num_experts_per_tok": 1},  # the family's only supported value
    "reformer": {"is_decoder": True},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
}

_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id")
_DEPTH_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _depth(values: dict[str, Any]) -> int | None:
    return next((values[k] for k in _DEPTH_FIELDS if isinstance(values.get(k), int)), None)


def _is_per_layer(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(str(i).isdigit() for i in value)


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


def _shrink(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    old = _depth(out)
    for key, tiny in TINY_SIZES.items():
        if key in out and (out[key] is None or isinstance(out[key], int)) and not isinstance(out[key], bool):
            out[key] = tiny
    for key, value in list(out.items()):
        if not _is_per_layer(value) and isinstance(value, dict) and ("model_type" in value or key.endswith("_config")):
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


def tiny_config(model_type: str, **overrides: Any):  # type: ignore[no-untyped-def]
    """The default config of ``model_type`` shrunk to a tiny model of :data:`NUM_LAYERS` blocks."""
    from transformers import AutoConfig

    adjust = ADJUSTMENTS.get(model_type, {})
    default = AutoConfig.for_model(model_type, **adjust)
    values = {**_shrink(default.to_dict()), **adjust, **overrides}
    values.pop("model_type", None)
    values.pop("transformers_version", None)
    return type(default).from_dict(values)
