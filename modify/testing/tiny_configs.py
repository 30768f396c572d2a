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
    "num_hidden_layers": NUM_LAYERS,
    "n_layer": NUM_LAYERS,
    "n_layers": NUM_LAYERS,
    "num_layers": NUM_LAYERS,
    "decoder_layers": NUM_LAYERS,
    # width
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "dim": 64,
    "n_embed": 64,
    "embed_dim": 64,
    "word_embed_proj_dim": 64,
    "intermediate_size": 128,
    "ffn_dim": 128,
    "n_inner": 128,
    "decoder_ffn_dim": 128,
    "ffn_hidden_size": 128,
    "d_ff": 128,
    # heads
    "num_attention_heads": 4,
    "n_head": 4,
    "n_heads": 4,
    "num_heads": 4,
    "decoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    # latent attention (MLA)
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    # experts
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "n_group": 1,
    "topk_group": 1,
    # linear attention / state space
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "mamba_n_heads": 4,
    "mamba_d_head": 16,
    "mamba_d_state": 16,
    "mamba_d_ssm": 64,
    "ssm_state_size": 16,
    "state_size": 16,
    # tables
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "n_positions": 256,
    "n_ctx": 256,
}

#: model_type -> extra config fields the family needs at tiny size (applied after :data:`TINY_SIZES`).
ADJUSTMENTS: dict[str, dict[str, Any]] = {}

_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id")


def _shrink(values: dict[str, Any], old_layers: int | None) -> dict[str, Any]:
    out = dict(values)
    for key, tiny in TINY_SIZES.items():
        if key in out and (out[key] is None or isinstance(out[key], int)) and not isinstance(out[key], bool):
            out[key] = tiny
    layers = next((out[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if k in out), None)
    for key, value in list(out.items()):
        if isinstance(value, dict) and ("model_type" in value or key.endswith("_config")):
            sub_layers = next((value.get(k) for k in ("num_hidden_layers", "num_layers", "n_layer")), None)
            out[key] = _shrink(value, sub_layers)
        elif isinstance(value, list) and old_layers and layers and len(value) == old_layers and old_layers != layers:
            out[key] = value[:layers]  # one entry per layer (layer_types, per-layer flags)
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

    default = AutoConfig.for_model(model_type)
    values = default.to_dict()
    old_layers = next((values[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if k in values), None)
    values = {**_shrink(values, old_layers), **ADJUSTMENTS.get(model_type, {}), **overrides}
    values.pop("model_type", None)
    values.pop("transformers_version", None)
    return type(default).from_dict(values)
