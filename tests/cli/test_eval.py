"""``modify eval`` and :func:`modify.train.evaluate.evaluate`: perplexity that matches the model's own loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import modify
from modify.cli import main
from modify.testing import tiny_model, tiny_tokenizer
from modify.train.evaluate import evaluate

SEQ_LEN = 32
TEXT = "".join(f"Line {i}: the quick brown fox jumps over {i * 7 % 13} lazy dogs.\n" for i in range(24))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama with a tokenizer (eos set), and its conversion at capacity 0.5, every other block."""
    root = tmp_path_factory.mktemp("eval-models")
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = "<unk>"
    dense, converted = root / "dense", root / "converted"
    tiny_model("llama").save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    assert main(["convert", str(dense), str(converted), "--capacity", "0.5", "-q"]) == 0
    return {"dense": dense, "converted": converted}


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("eval-data") / "heldout.txt"
    path.write_text(TEXT)
    return path


def _eval(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    code = main(["eval", *argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def _reference_loss(model: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """Token-weighted mean of the model's own ``labels=`` loss (HF averages within a batch; undo that)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in ids.split(batch_size):
            n = batch.shape[0] * (batch.shape[1] - 1)
            total += model(batch, labels=batch, use_cache=False).loss.item() * n
            count += n
    return total / count, count


def _sequences(directory: Path) -> torch.Tensor:
    """The text as ``modify eval`` packs it, built independently: ids, eos after the document, full rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    rows = len(ids) // SEQ_LEN
    return torch.tensor(ids[: rows * SEQ_LEN]).view(rows, SEQ_LEN)


@pytest.mark.parametrize("which", ["dense", "converted"])
def test_perplexity_matches_the_models_own_loss(which: str, models: dict, text: Path, capsys) -> None:
    # 5 per batch: the last batch is short, and the partial batch must count as much as the others.
    report = _eval(capsys, str(models[which]), "--data", str(text), "--seq-len", str(SEQ_LEN), "--batch-size", "5")
    ids = _sequences(models[which])
    assert ids.shape[0] % 5 != 0
    model = modify.from_pretrained(models[which]) if which == "converted" else tiny_model("llama")
    loss, count = _reference_loss(model, ids, batch_size=3)
    assert report["ppl"] == pytest.approx(math.exp(report["loss"]), rel=1e-12)
    assert report["loss"] == pytest.approx(loss, rel=1e-5)
    assert report["ppl"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert report["tokens"] == ids.numel() and report["predicted_tokens"] == count
    assert report["seq_len"] == SEQ_LEN and report["model"] == str(models[which])
    assert report["converted"] is (which == "converted") and report["tokens_per_second"] > 0
    assert report["flops_per_token"] == modify.flops(model, SEQ_LEN).routed / SEQ_LEN


def test_batching_does_not_change_the_loss_and_max_tokens_limits(models: dict, text: Path, capsys) -> None:
    args = (str(models["converted"]), "--data", str(text), "--seq-len", str(SEQ_LEN))
    one, seven = _eval(capsys, *args, "--batch-size", "1"), _eval(capsys, *args, "--batch-size", "7")
    assert seven["loss"] == pytest.approx(one["loss"], rel=1e-5) and seven["tokens"] == one["tokens"]
    limited = _eval(capsys, *args, "--max-tokens", str(3 * SEQ_LEN + 5))
    assert limited["tokens"] == 3 * SEQ_LEN
    model = modify.from_pretrained(models["converted"])
    assert limited["loss"] == pytest.approx(_reference_loss(model, _sequences(models["converted"])[:3], 3)[0], rel=1e-5)


def test_routed_flops_below_dense(models: dict, text: Path, capsys) -> None:
    args = ("--data", str(text), "--seq-len", str(SEQ_LEN))
    dense, routed = _eval(capsys, str(models["dense"]), *args), _eval(capsys, str(models["converted"]), *args)
    assert routed["flops_per_token"] < dense["flops_per_token"] == dense["flops_per_token_dense"]
    assert routed["flops_per_token_dense"] == dense["flops_per_token"]


def test_plain_output_is_one_line_and_bfloat16_runs(models: dict, text: Path, capsys) -> None:
    code = main(["eval", str(models["converted"]), "--data", str(text), "--seq-len", "16", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert code == 0 and len(out.strip().splitlines()) == 1
    assert out.startswith("perplexity ") and "tokens/s" in out and "of dense" in out


def test_help_has_examples(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--help"])
    assert exit_.value.code == 0 and "examples:\n  modify eval" in capsys.readouterr().out


@pytest.mark.parametrize(
    "case,code,message",
    [
        ("missing model", 1, "does not exist"),
        ("missing data", 1, "does not exist"),
        ("empty data", 1, "empty"),
        ("directory without text", 1, "no text files"),
        ("too little data", 1, "fewer than --seq-len"),
        ("no tokenizer", 1, "no tokenizer"),
        ("seq-len 1", 2, "at least 2"),
        ("seq-len beyond positions", 2, "positions"),
        ("batch-size 0", 2, "at least 1"),
        ("max-tokens below seq-len", 2, "less than one sequence"),
        ("routing causal on a dense model", 2, "needs a converted model"),
    ],
)
def test_bad_inputs_get_one_line(
    case: str, code: int, message: str, models: dict, saved_models: dict, text: Path, tmp_path: Path, capsys
) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "no-text").mkdir()
    (tmp_path / "no-text" / "weights.bin").write_bytes(b"\0")
    model, data, extra = str(models["converted"]), str(text), []
    if case == "missing model":
        model = str(tmp_path / "nowhere")
    elif case == "missing data":
        data = str(tmp_path / "missing.txt")
    elif case == "empty data":
        data = str(tmp_path / "empty.txt")
    elif case == "directory without text":
        data = str(tmp_path / "no-text")
    elif case == "too little data":
        data = str(tmp_path / "short.txt")
    elif case == "no tokenizer":
        model = str(saved_models["llama"])
    else:
        flag, value = {
            "seq-len 1": ("--seq-len", "1"),
            "seq-len beyond positions": ("--seq-len", "4096"),
            "batch-size 0": ("--batch-size", "0"),
            "max-tokens below seq-len": ("--max-tokens", "8"),
        }.get(case, ("--routing", "causal"))
        if case == "routing causal on a dense model":
            model = str(models["dense"])
        extra = [flag, value]
    result = main(["eval", model, "--data", data, "--seq-len", str(SEQ_LEN), *extra])
    captured = capsys.readouterr()
    assert result == code, captured.err
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("modify eval: error: ") and message in captured.err
    assert "Traceback" not in captured.err


def test_causal_routing_is_what_sampling_runs(models: dict, text: Path, capsys) -> None:
    ppl = {}
    for rule in ("topk", "causal"):
        assert main(["eval", str(models["converted"]), "--data", str(text), "--seq-len", str(SEQ_LEN),
                     "--routing", rule, "--json"]) == 0  # fmt: skip
        summary = json.loads(capsys.readouterr().out)
        assert summary["routing"] == rule
        ppl[rule] = summary["ppl"]
    # fresh routers score 0, not above the threshold 0: causally the routed blocks skip every token
    assert ppl["causal"] != ppl["topk"]


# -- the library function -----------------------------------------------------------------------------------


def test_evaluate_restores_mode_and_reduces_before_dividing() -> None:
    model = modify.convert(tiny_model("llama"), capacity=0.5).train()
    batches = [torch.randint(3, 97, (2, 16)) for _ in range(3)]
    plain = evaluate(model, batches)
    assert model.training  # restored
    assert plain.tokens == 96 and plain.predicted_tokens == 90 and plain.ppl == pytest.approx(math.exp(plain.loss))
    assert plain.flops_per_token == modify.flops(model, 16).routed / 16

    # Two "ranks" that saw the same data: the sums double, the mean stays; what reduce got is the raw sums.
    seen = []
    doubled = evaluate(model, batches, reduce=lambda t: seen.append(t.clone()) or t * 2)
    assert seen[0].dtype == torch.float64 and seen[0][1:].tolist() == [90.0, 96.0, 0.0]  # no teacher: no KL sum
    assert doubled.tokens == 192 and doubled.loss == pytest.approx(plain.loss, rel=1e-9)

    first = evaluate(model, iter(batches), max_batches=1)
    assert first.tokens == 32
    with torch.no_grad():
        expected = model.eval()(batches[0], labels=batches[0]).loss.item()
    assert first.loss == pytest.approx(expected, rel=1e-5)
    assert evaluate(model, batches, autocast_dtype=torch.bfloat16).loss == pytest.approx(plain.loss, rel=0.05)


def test_evaluate_with_a_teacher_reports_the_kl_token_weighted() -> None:
    from modify.train.distill import kl_per_token

    model = modify.convert(tiny_model("llama"), capacity=0.5)
    batches = [torch.randint(3, 97, (2, 16)) for _ in range(2)]

    def teacher(ids: torch.Tensor) -> torch.Tensor:
        with modify.routing_disabled(model):
            return model(input_ids=ids).logits

    result = evaluate(model, batches, teacher=teacher)
    with torch.no_grad():
        rows = [
            kl_per_token(model(input_ids=b).logits[:, :-1].reshape(-1, 97), teacher(b)[:, :-1].reshape(-1, 97))
            for b in batches
        ]
    assert result.kl == pytest.approx(torch.cat(rows).double().mean().item(), rel=1e-6) and result.kl > 0
    assert math.isnan(evaluate(model, batches).kl)


def test_evaluate_without_batches_gives_nan_not_an_error() -> None:
    result = evaluate(tiny_model("llama"), [])
    assert result.tokens == 0 and math.isnan(result.loss) and math.isnan(result.ppl)
