"""Removing blocks from families whose config decides a layer's kind from its index (issue 30, item 1).

Qwen2-MoE's ``decoder_sparse_step`` and ``mlp_only_layers``, DeepSeek-V3's ``first_k_dense_replace``, Jamba's
``attn_layer_period`` / ``attn_layer_offset``, Llama 4's ``moe_layers`` (a list of indices, as long as the depth
when every layer is MoE) and their kin: after :func:`modify.remove_blocks` the saved config must rebuild every
kept layer as it is, or the checkpoint reloads with random layers. Each case either reloads as the model in
memory (no missing or unexpected keys, the same logits) or is refused before the model changes.

The families are the supported ones (docs/support-matrix.md) whose reload differed from the model in memory
when blocks 0, 1 or 2 and 3 were removed before this fix, plus the issue's layouts set explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from modify.errors import ModifyError, NotExportableError
from modify.passes.find_block_stack import find_block_stack
from modify.removal import remove_blocks
from modify.testing.matrix import build

REMOVALS = ([0], [1], [2, 3])

#: model_type, config overrides, and whether the layout is renumbered (True) or refused (False) per removal.
CASES: list[tuple[str, dict[str, Any], tuple[bool, bool, bool]]] = [
    # one sparse layer in every two, and layer 0 dense by list as well: sparse layers 1 and 3
    ("qwen2_moe", {"decoder_sparse_step": 2, "mlp_only_layers": [0]}, (True, True, True)),
    ("qwen3_moe", {"decoder_sparse_step": 2, "mlp_only_layers": [0]}, (True, True, True)),
    ("flint", {}, (True, True, True)),
    ("deepseek_v3", {"first_k_dense_replace": 1}, (True, True, True)),
    ("deepseek_v3", {}, (True, True, True)),  # the default: three dense layers first
    ("glm4_moe", {}, (True, True, True)),
    ("sarvam_moe", {}, (True, True, True)),
    ("afmoe", {}, (True, True, True)),
    ("lfm2_moe", {}, (True, True, True)),
    ("ernie4_5_moe", {}, (True, True, True)),
    ("llama4_text", {}, (True, True, True)),  # every layer MoE: moe_layers == [0, 1, 2, 3]
    ("llama4_text", {"moe_layers": [1, 3]}, (True, True, True)),
    # attention at 1 and 3 of [M, A, M, A]: [A, M, A], [M, M, A] and [M, A] are periodic again
    ("jamba", {}, (True, True, True)),
    ("gpt_neo", {"window_size": 4}, (True, True, True)),  # a local window that bites within 12 tokens
    ("mllama", {}, (True, True, True)),  # cross-attention layers by index
    # what no field renumbers: lambda from the layer index (diffllama), residual indices (beam), a residual
    # scale from the depth (minicpm3), no norm in layer 0 only (modernbert-decoder), a bias in the last
    # layer only (gpt_neox_japanese)
    ("diffllama", {}, (False, False, True)),
    ("beam", {}, (False, False, True)),
    ("minicpm3", {}, (False, False, False)),
    ("modernbert-decoder", {}, (False, True, True)),
    ("gpt_neox_japanese", {}, (True, True, False)),
]


def _build(model_type: str, **overrides: Any) -> Any:
    return build(model_type, **overrides)


def _ids(model: Any) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("model_type", "overrides", "expected"), CASES, ids=lambda v: str(v) if v else "default")
def test_removal_reloads_as_the_model_or_is_refused(
    model_type: str, overrides: dict[str, Any], expected: tuple[bool, ...], tmp_path: Path
) -> None:
    for removed, renumbered in zip(REMOVALS, expected, strict=True):
        model = _build(model_type, **overrides)
        ids = _ids(model)
        depth = len(find_block_stack(model)[1])
        if not renumbered:
            with pytest.raises(NotExportableError):
                remove_blocks(model, removed)
            assert len(find_block_stack(model)[1]) == depth  # refused before anything changed
            continue
        remove_blocks(model, removed)
        with torch.no_grad():
            expected_logits = model(input_ids=ids, use_cache=False).logits
        out = tmp_path / f"{'-'.join(map(str, removed))}"
        model.save_pretrained(out)
        # the model's own class: transformers maps no Auto class to a saved MllamaForCausalLM, removal or not
        again, report = type(model).from_pretrained(out, attn_implementation="eager", output_loading_info=True)
        assert not report["missing_keys"] and not report["unexpected_keys"], (removed, report)
        assert len(find_block_stack(again)[1]) == depth - len(removed)
        with torch.no_grad():
            reloaded = again.eval()(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(reloaded, expected_logits, msg=str(removed))


def test_llama4_moe_layers_are_renumbered_as_indices() -> None:
    """Every layer MoE: ``moe_layers`` is as long as the depth but holds indices, not one value per layer."""
    model = _build("llama4_text")
    remove_blocks(model, [1])
    assert model.config.moe_layers == [0, 1, 2]
    assert all(layer.is_moe_layer for layer in model.model.layers)


def test_jamba_layout_that_is_no_longer_periodic_is_refused() -> None:
    """Six layers, attention at 1 and 4 (period 3, offset 1): without layer 2 it sits at 1 and 3 of five layers,
    which no period and offset give, so the reloaded model would put attention elsewhere."""
    model = _build("jamba", num_hidden_layers=6, attn_layer_period=3, attn_layer_offset=1)
    with pytest.raises(NotExportableError) as info:
        remove_blocks(model, [2])
    assert "\n" not in str(info.value)
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6


def test_removing_every_block_is_a_typed_error() -> None:
    model = _build("qwen2_moe")
    with pytest.raises(NotExportableError) as info:
        remove_blocks(model, [0, 1, 2, 3])
    assert isinstance(info.value, ModifyError) and "\n" not in str(info.value)


def test_index_keyed_dicts_that_are_not_per_layer_settings_stay() -> None:
    """``id2label`` is keyed by index too, of labels, not layers: it must come through unchanged."""
    model = _build("qwen2_moe")
    labels = dict(model.config.id2label)
    assert labels and all(str(k).isdigit() for k in labels)
    remove_blocks(model, [0])
    assert model.config.id2label == labels
