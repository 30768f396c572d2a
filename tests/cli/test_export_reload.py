"""``modify export`` reports success only for what reloads as the converted model (issue 30, items 1 and 9, and
the check that a plan was made for SRC): it reloads what it wrote with transformers and compares logits, and
otherwise writes nothing; a layout the config can't renumber, a plan that removes every block and a plan made
on another checkpoint are refused with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import modify
from modify.cli import main
from modify.testing import tiny_model, tiny_tokenizer
from modify.testing.tiny_configs import tiny_config
from tests.cli.conftest import tree_digest
from tests.cli.test_export import _failed, text  # noqa: F401 - text: the plays fixture, for calibrating


def _save(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _from_config(model_type: str, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def test_export_of_an_index_dependent_layout_reloads_as_the_converted_model(tmp_path: Path, capsys) -> None:
    """Qwen2-MoE with a sparse layer in every two (1 and 3) and block 1 removed: the exported config says which
    of the kept layers are sparse, so the checkpoint reloads with its experts, not random dense layers."""
    src = _save(_from_config("qwen2_moe", decoder_sparse_step=2, mlp_only_layers=[0]), tmp_path / "src")
    converted, out = tmp_path / "removed", tmp_path / "pruned"
    assert main(["convert", str(src), str(converted), "--capacity", "0", "--layers", "1", "-q"]) == 0
    assert main(["export", str(converted), str(out), "-q"]) == 0
    routed = modify.from_pretrained(converted)
    plain, report = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation=routed.config._attn_implementation, output_loading_info=True
    )
    assert not report["missing_keys"] and not report["unexpected_keys"]
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ids).logits, routed(ids).logits)


def test_export_refuses_a_layout_it_cant_renumber(saved_models: dict, tmp_path: Path, capsys) -> None:
    """DiffLlama computes each attention's lambda from its layer index, which no config field holds: deleting
    block 1 would reload block 2 with block 1's lambda. Refused, nothing written."""
    src = _save(_from_config("diffllama"), tmp_path / "src")
    converted, out = tmp_path / "removed", tmp_path / "pruned"
    assert main(["convert", str(src), str(converted), "--capacity", "0", "--layers", "1", "-q"]) == 0
    code, err = _failed(["export", str(converted), str(out)], capsys)
    assert code == 1 and "internal error" not in err
    assert not out.exists() and not list(tmp_path.glob(".pruned*"))


def test_export_reloads_what_it_wrote_before_reporting_success(
    saved_models: dict, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong between the model in memory and the files (here a save that alters one weight),
    the reload tells: one line, exit 1, no OUT."""
    converted, out = tmp_path / "removed", tmp_path / "pruned"
    assert main(["convert", str(saved_models["llama"]), str(converted), "--capacity", "0", "--layers", "1", "-q"]) == 0
    original = transformers.PreTrainedModel.save_pretrained

    def altered(self, directory, *args, **kwargs):  # type: ignore[no-untyped-def]
        state = {k: v.clone() for k, v in self.state_dict().items()}
        state["model.norm.weight"] += 0.5
        return original(self, directory, *args, **{**kwargs, "state_dict": state})

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", altered)
    code, err = _failed(["export", str(converted), str(out)], capsys)
    assert code == 1 and "internal error" not in err
    assert not out.exists() and not list(tmp_path.glob(".pruned*"))


def test_export_of_a_plan_that_removes_every_block(saved_models: dict, tmp_path: Path, capsys) -> None:
    converted, out = tmp_path / "removed", tmp_path / "pruned"
    argv = ["convert", str(saved_models["llama"]), str(converted), "--capacity", "0", "--layers", "all", "-q"]
    assert main(argv) == 0
    code, err = _failed(["export", str(converted), str(out)], capsys)
    assert code == 1 and "internal error" not in err
    assert not out.exists()


def test_export_refuses_a_plan_made_for_another_checkpoint(text: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    src = _save(tiny_model("llama", num_hidden_layers=6), tmp_path / "src")
    other = _save(tiny_model("llama", seed=1, num_hidden_layers=6), tmp_path / "other")
    plan = tmp_path / "plan.json"
    flags = ["--tokens", "2048", "--seq-len", "64", "--sensitivity-tokens", "256", "--flops-budget", "0.5"]
    calibrate = ["calibrate", str(src), "--data", str(text), "--out", str(plan), *flags, "--removal", "only", "-q"]
    assert main(calibrate) == 0
    before = tree_digest(other)
    code, err = _failed(["export", str(other), str(tmp_path / "pruned"), "--plan", str(plan)], capsys)
    assert code == 1 and "internal error" not in err
    assert not (tmp_path / "pruned").exists() and tree_digest(other) == before
    assert main(["export", str(src), str(tmp_path / "pruned"), "--plan", str(plan), "-q"]) == 0
