"""Skip paths: what a routed block gives the tokens it skips (modify/routing/skip_path.py,
modify/calibrate/skip_fit.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import modify
from modify import MoDConfig
from modify.api import routed_blocks
from modify.calibrate.skip_fit import NormalSums, SkipStats, features, fit_linear, fit_mlp, mlp_first_layer
from modify.routing import capacity_tokens, select_tokens, skipped_tokens
from modify.routing.skip_path import SKIP_ATTR, parse_spec, skip_path_flops
from modify.testing import FAMILIES, tiny_model
from modify.train.trainable import prepare_trainable


def _randomise_skip_paths(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if SKIP_ATTR in name:
                p.normal_(0, 0.1)


def _ids(model: torch.nn.Module, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_capacity_one_with_a_skip_path_is_the_dense_model(family: str, kind: str) -> None:
    model = tiny_model(family).eval()
    ids = _ids(model)
    with torch.no_grad():
        dense = model(ids).logits
        modify.convert(model, capacity=1.0, layers="all", skip_path=kind, skip_rank=4)
        _randomise_skip_paths(model)  # a fitted path, not a zero one: still no token is skipped
        assert torch.equal(model(ids).logits, dense)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "phi"])
def test_skipped_tokens_get_the_path_and_routed_tokens_the_block(family: str) -> None:
    """Block by block: skipped rows are exactly x + path(norm(x)); routed rows are what the path-less block gives."""
    model = tiny_model(family).eval()
    modify.convert(model, capacity=0.5, layers="all", skip_path="linear", skip_rank=4)
    _randomise_skip_paths(model)
    reference = tiny_model(family).eval()
    modify.convert(reference, capacity=0.5, layers="all")
    reference.load_state_dict(model.state_dict(), strict=False)
    ids = _ids(model)
    seen: list[tuple] = []
    for block, state in routed_blocks(model):
        block.register_forward_hook(lambda m, a, k, out, _s=state: seen.append((m, _s, a, k, out)), with_kwargs=True)
    with torch.no_grad():
        model(ids, use_cache=False)  # the reference block is called again with the same arguments
        for block, state, args, kwargs, out in seen:
            x = kwargs.get(state.spec.hidden, args[0] if args else None)
            y = out[0] if isinstance(out, tuple) else out
            ref = reference.get_submodule(state.name)(*args, **kwargs)
            ref = ref[0] if isinstance(ref, tuple) else ref
            scores = block.mod_router(x)
            idx = select_tokens(scores, capacity_tokens(0.5, x.shape[1]))
            rest = skipped_tokens(idx, x.shape[1])
            take = lambda t, i: torch.gather(t, 1, i.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
            assert torch.equal(take(y, idx), take(ref, idx))
            xs = take(x, rest)
            normed = block.get_submodule(state.input_norm)(xs) if state.input_norm else xs
            assert state.input_norm  # every tested family has an input norm
            assert torch.equal(take(y, rest), xs + getattr(block, SKIP_ATTR)(normed))


def test_skipped_tokens_are_the_complement_in_order() -> None:
    scores = torch.randn(3, 11)
    idx = select_tokens(scores, 4)
    rest = skipped_tokens(idx, 11)
    assert rest.shape == (3, 7)
    for r, i in zip(rest.tolist(), idx.tolist()):
        assert r == sorted(set(range(11)) - set(i))


def test_a_new_skip_path_changes_nothing_until_trained() -> None:
    pure = tiny_model("llama").eval()
    modify.convert(pure, capacity=0.25, layers="all")
    model = tiny_model("llama").eval()
    modify.convert(model, capacity=0.25, layers="all", skip_path="mlp", skip_rank=8)
    model.load_state_dict(pure.state_dict(), strict=False)
    ids = _ids(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, pure(ids).logits)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_gradient_reaches_the_skip_path(kind: str) -> None:
    model = tiny_model("llama")
    modify.convert(model, capacity=0.25, layers=[1, 2], skip_path=kind, skip_rank=4)
    ids = _ids(model)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if SKIP_ATTR in n}
    assert grads and all(g is not None for g in grads.values())
    # The output layer starts at zero, so at first only it moves, as LoRA's B does.
    output = "up.weight" if kind == "linear" else "fc2.weight"
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith(output))


def test_save_load_and_revert(tmp_path: Path) -> None:
    from modify.io.checkpoint import Source, save_converted
    from modify.testing import tiny_tokenizer

    model = tiny_model("llama").eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids(model)
    with torch.no_grad():
        dense = model(ids).logits
    modify.convert(model, capacity=[0.5, 0.25], layers=[1, 3], skip_path=["linear-4", "mlp-6"])
    _randomise_skip_paths(model)
    save_converted(model, tiny_tokenizer(), tmp_path / "out", Source("directory", tmp_path))
    loaded = modify.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()  # as tiny_model builds
    assert loaded.config.mixture_of_depths["skip_paths"] == ["linear-4", "mlp-6"]
    assert [b.skip_path for b in modify.find_blocks(loaded)] == [None, "linear-4", None, "mlp-6"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        assert not torch.equal(loaded(ids).logits, dense)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "1 (0.5, skip path linear-4)" in card and "skip paths included" in card

    modify.revert(model)
    assert not any("skip_path" in k or "router" in k for k in model.state_dict())
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)


def test_training_selects_skip_paths_by_name() -> None:
    model = tiny_model("llama")
    modify.convert(model, capacity=0.5, layers=[1], skip_path="linear", skip_rank=4)
    prepare_trainable(model, "routers+skip")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {
        "model.layers.1.mod_router.weight",
        "model.layers.1.mod_router.bias",
        "model.layers.1.mod_router.scale",
        "model.layers.1.mod_skip_path.down.weight",
        "model.layers.1.mod_skip_path.down.bias",
        "model.layers.1.mod_skip_path.up.weight",
    }
    lora = prepare_trainable(model, "lora", rank=2)
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert any("mod_skip_path.up.weight" in n for n in names)
    assert not any("mod_skip_path" in n and "lora_" in n for n in names)  # trained in full, not adapted


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"skip_path": "conv"}, "unknown skip path 'conv'"),
        ({"skip_path": "linear", "skip_rank": 0}, "skip rank 0 must be a positive integer"),
        ({"skip_path": ["linear", "mlp", "identity"]}, "got 3 skip paths for 2 routed blocks"),
        ({"skip_path": "linear-x"}, "unknown skip path 'linear-x'"),
    ],
)
def test_bad_skip_paths_raise_and_change_nothing(kwargs: dict, message: str) -> None:
    model = tiny_model("llama")
    before = set(model.state_dict())
    with pytest.raises(ValueError, match=message):
        modify.convert(model, capacity=0.5, layers="every-other", **kwargs)
    assert set(model.state_dict()) == before and not modify.api.is_converted(model)


def test_config_validates_skip_paths() -> None:
    assert MoDConfig(4, [1, 3], [0.5, 0.5]).skip_paths == ["identity", "identity"]  # plans saved before skip paths
    with pytest.raises(ValueError, match="got 1 skip paths for 2 routed blocks"):
        MoDConfig(4, [1, 3], [0.5, 0.5], skip_paths=["linear-8"])
    with pytest.raises(ValueError, match="unknown skip path 'linear'"):
        MoDConfig(4, [1], [0.5], skip_paths=["linear"])
    assert parse_spec("mlp-96") == ("mlp", 96) and skip_path_flops("linear-8", 10) == 320


def _data(n: int = 4000, d: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, d, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, d, dtype=torch.float64))
    y = torch.tanh(x) @ w + 0.3 + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, y


def _sums(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    sums = NormalSums.zeros(1, x.shape[1] + 1, y.shape[1])
    for chunk in range(0, len(x), 1000):  # streamed in batches, as calibration does
        sums.add(0, features(x[chunk : chunk + 1000].float()), y[chunk : chunk + 1000].float())
    return sums.gram[0], sums.cross[0], float(sums.sq[0])


def test_reduced_rank_fit_matches_a_float64_reference() -> None:
    x, y = _data()
    f = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    full = torch.linalg.lstsq(f, y).solution
    fitted = f @ full
    v = torch.linalg.svd(fitted, full_matrices=False).Vh.T  # principal directions of the fitted values
    previous = -1.0
    for rank in (1, 3, 6, 12):
        state, r2 = fit_linear(*_sums(x, y), rank)
        expected = f @ full @ v[:, :rank] @ v[:, :rank].T
        got = (x.float() @ state["down.weight"].T + state["down.bias"]) @ state["up.weight"].T
        assert torch.allclose(got.double(), expected, atol=2e-3), rank
        sse = ((expected - y) ** 2).sum()
        assert r2 == pytest.approx(1 - float(sse / ((y - y.mean(0)) ** 2).sum()), abs=1e-4)
        assert r2 > previous  # more rank, better fit
        previous = r2


def test_mlp_fit_reads_standardised_directions_and_fits_its_output() -> None:
    x, y = _data(seed=1)
    gram, cross, sq = _sums(x, y)
    first = mlp_first_layer(gram, cross, 8)
    z = x.float() @ first["fc1.weight"].T + first["fc1.bias"]
    assert torch.allclose(z.mean(0), torch.zeros(8), atol=1e-3) and torch.allclose(z.std(0), torch.ones(8), atol=1e-2)
    h = torch.nn.functional.silu(z)
    hsums = NormalSums.zeros(1, 9, y.shape[1])
    hsums.add(0, features(h), y.float())
    state, r2 = fit_mlp(first, hsums.gram[0], hsums.cross[0], float(hsums.sq[0]))
    pred = h @ state["fc2.weight"].T + state["fc2.bias"]
    hf = torch.cat([h.double(), torch.ones(len(h), 1, dtype=torch.float64)], 1)
    best = hf @ torch.linalg.lstsq(hf, y).solution
    assert torch.allclose(pred.double(), best, atol=2e-3)
    assert r2 > fit_linear(gram, cross, sq, 1)[1]


def test_levels_give_each_capacity_its_skipped_tokens() -> None:
    stats = SkipStats([0.125, 0.25, 0.5, 0.75], num_blocks=1, dim=4, keep_first=1)
    scores = torch.randn(3, 40)
    level = stats.levels(scores)
    for j, c in enumerate(stats.capacities):
        routed = select_tokens(scores, capacity_tokens(c, 40), keep_first=1)
        skipped = torch.ones_like(level, dtype=torch.bool).scatter_(1, routed, False)
        assert torch.equal(skipped, level > j)
    assert bool((level[:, 0] == 0).all())  # the kept first token is routed at every capacity
