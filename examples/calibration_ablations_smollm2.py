"""What limits zero-shot routing of SmolLM2-135M: token-selection rules, attention context, the budget.

    python examples/calibration_ablations_smollm2.py [--plan PLAN.json] [--tokens 16384] [--eval-tokens 4096]

Takes a calibrated plan (``--plan``, written by ``modify calibrate``; else calibrates on ``--tokens`` of the
plays titled A–L at budget 0.75) and measures zero-shot perplexity on plays titled M–Z, as a ratio to dense:

1. The plan with routers that choose tokens by different rules: no rule (a zero router keeps the first k),
   random (each block on its own, or one shared draw for all blocks), ridge fits from the block's input to
   three per-token targets (log ‖Δ‖, which calibration uses; the first-order loss increase of dropping Δ,
   −g·Δ with g = ∂loss/∂(block output); the sampled-Fisher estimate log (g_s·Δ)² with labels drawn from the
   model itself), the ‖Δ‖ oracle measured on the routed model's own inputs (not a router: it runs the block
   on every token first), the −g·Δ oracle on the evaluation text itself (it reads the labels: an upper
   bound, not a router), and routers trained by gradient through the gate for one epoch on the
   calibration text (the model frozen); and a plan of the same cost that routes many blocks a little.
2. One block at a time, on calibration text: the loss increase of the routed block against the block run
   on every token with Δ kept only on the same chosen tokens, i.e. with its full attention context.
3. The planner's plan at several budgets, with log ‖Δ‖ routers: where 1.5x dense is reached.

Everything runs in bfloat16 (the calibration dtype); the dense row is the same model unrouted.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

import modify
from modify.calibrate.calibration import (
    CalibrationSettings,
    calibrate,
    fit_router,
    grid_costs,
    load_router,
    token_windows,
)
from modify.calibrate.plan_file import load_plan
from modify.calibrate.planning import plan_under_budget
from modify.io.assets import load_smollm2, shakespeare_split
from modify.passes.find_block_stack import find_block_stack
from modify.routing import STATE_ATTR, capacity_tokens, select_tokens
from modify.routing.router import ROUTER_ATTR

TARGETS = ("log_norm", "first_order", "fisher")
BATCH = 4


def batches(ids: torch.Tensor) -> list[torch.Tensor]:
    return [ids[i : i + BATCH] for i in range(0, len(ids), BATCH)]


def block_io(blocks: list[torch.nn.Module], grad: bool) -> tuple[dict, dict, list]:
    """Hooks recording each block's input and output (the output keeps its gradient when ``grad``)."""
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def hook(i: int) -> Callable:
        def fn(block: torch.nn.Module, args: tuple, kwargs: dict, out: object) -> None:
            y = out[0] if isinstance(out, tuple) else out
            if grad:
                y.retain_grad()
            inputs[i], outputs[i] = (args[0] if args else kwargs["hidden_states"]), y

        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    return inputs, outputs, handles


def labelled_gradients(model, blocks, embeddings, windows) -> Iterator[tuple[dict, dict, Any, dict]]:
    """Per batch of the dense model: block inputs, outputs, the model's output, and −g·Δ per block, where
    g = ∂loss/∂(block output) for the text's own labels (the outputs' .grad is cleared for another backward).
    """
    # The embeddings' output needs a gradient for the blocks' outputs to get one; the weights stay frozen.
    handle = embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    try:
        for ids in batches(windows):
            inputs, outputs, handles = block_io(blocks, grad=True)
            out = model(input_ids=ids, labels=ids, use_cache=False)
            out.loss.backward(retain_graph=True)
            for h in handles:
                h.remove()
            first_order = {i: -(y.grad.float() * (y - inputs[i]).detach().float()).sum(-1) for i, y in outputs.items()}
            for y in outputs.values():
                y.grad = None
            yield inputs, outputs, out, first_order
    finally:
        handle.remove()


def target_statistics(model, blocks, windows, embeddings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ [x,1]ᵀ[x,1] and Σ [x,1]ᵀ target per block and target, over a forward and two backwards per batch."""
    n, dim = len(blocks), embeddings.embedding_dim
    gram = torch.zeros(n, dim + 1, dim + 1, dtype=torch.float64)
    moments = {t: torch.zeros(n, dim + 1, dtype=torch.float64) for t in TARGETS}
    for inputs, outputs, out, first_order in labelled_gradients(model, blocks, embeddings, windows):
        logits = out.logits[:, :-1].float()
        sampled = torch.distributions.Categorical(logits=logits).sample()
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), sampled.flatten()).backward()
        for i in range(n):
            x, delta = inputs[i].detach().float(), (outputs[i] - inputs[i]).detach().float()
            feats = torch.cat([x.flatten(0, 1), torch.ones(x.shape[0] * x.shape[1], 1)], 1)
            values = {
                "log_norm": delta.norm(dim=-1).clamp_min(1e-12).log(),
                "first_order": first_order[i],
                "fisher": ((outputs[i].grad.float() * delta).sum(-1) ** 2).clamp_min(1e-30).log(),
            }
            gram[i] += (feats.T @ feats).double()
            for t, v in values.items():
                moments[t][i] += (feats.T @ v.reshape(-1, 1)).squeeze(-1).double()
    return gram, moments


def mean_loss(model: torch.nn.Module, ids: torch.Tensor, before: Callable[[int], None] = lambda b: None) -> float:
    losses = []
    with torch.no_grad():
        for b, chunk in enumerate(batches(ids)):
            before(b)
            losses.append(model(input_ids=chunk, labels=chunk, use_cache=False).loss.item())
    return sum(losses) / len(losses)


def route(model: torch.nn.Module, capacities: list[float], keep_first: int) -> list[int]:
    """Convert ``model`` (reverting an earlier conversion first) to the plan; returns the routed blocks."""
    modify.revert(model)
    routed = [i for i, c in enumerate(capacities) if c < 1]
    modify.convert(model, capacity=[capacities[i] for i in routed], layers=routed, keep_first=keep_first)
    return routed


def load_routers(blocks: list[torch.nn.Module], routed: list[int], weights: dict[int, dict] | None) -> None:
    """Fitted routers (gates exactly 1), or zero routers (which keep the first k tokens) when ``weights`` is None."""
    for i in routed:
        load_router(getattr(blocks[i], ROUTER_ATTR), weights[i] if weights else None)


def with_scores(blocks, routed, scores: Callable[[int, int], torch.Tensor]) -> tuple[Callable, list]:
    """Routers replaced by given scores: ``scores(block, batch)``, gates held at 1; returns a per-batch setter
    and the hooks."""
    current = {"batch": 0}
    with torch.no_grad():
        for i in routed:
            getattr(blocks[i], ROUTER_ATTR).scale.zero_()
    handles = [
        getattr(blocks[i], ROUTER_ATTR).register_forward_hook(lambda m, a, o, _i=i: scores(_i, current["batch"]))
        for i in routed
    ]
    return (lambda b: current.update(batch=b)), handles


def oracle_norm(blocks, routed) -> list:
    """Routers replaced by each block's own ‖Δ‖ on the tokens it is given (the block runs dense first)."""
    handles = []
    for i in routed:
        block, state, box = blocks[i], getattr(blocks[i], STATE_ATTR), {}
        with torch.no_grad():
            getattr(block, ROUTER_ATTR).scale.zero_()

        def pre(m, args, kwargs, _state=state, _box=box):
            if _box.get("busy"):
                return
            _box["busy"], _state.enabled = True, False
            out = m(*args, **kwargs)
            y = out[0] if isinstance(out, tuple) else out
            _box["scores"] = (y - (args[0] if args else kwargs["hidden_states"])).float().norm(dim=-1)
            _box["busy"], _state.enabled = False, True

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(getattr(block, ROUTER_ATTR).register_forward_hook(lambda m, a, o, _b=box: _b["scores"]))
    return handles


def first_order_oracle(model, blocks, routed, held_out, embeddings) -> list[dict[int, torch.Tensor]]:
    """Per held-out batch and routed block: −g·Δ on the held-out text, measured on the dense model."""
    return [
        {i: first_order[i] for i in routed}
        for *_, first_order in labelled_gradients(model, blocks, embeddings, held_out)
    ]


def train_routers(model, blocks, routed, windows, lr: float) -> None:
    """One epoch of Adam on the routers alone, through the gate, on the calibration text."""
    params = [p for i in routed for p in getattr(blocks[i], ROUTER_ATTR).parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    for ids in batches(windows[torch.randperm(len(windows))]):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for p in params:
        p.requires_grad_(False)


def plan_cost(capacities: list[float], costs: list[dict[float, float]]) -> float:
    return sum(c[cap] for c, cap in zip(costs, capacities)) / sum(c[1.0] for c in costs)


def context_check(model, blocks, ids, checked: list[int], keep_first: int) -> dict[str, dict[str, float]]:
    """Loss increase with one block routed, against the block run on every token with Δ kept only on the
    same chosen tokens (full attention context): the share of the damage due to the missing keys.

    Tokens are chosen by the block's dense ‖Δ‖, the oracle calibration measures with.
    """
    inputs, outputs, handles = block_io(blocks, grad=False)
    with torch.no_grad():
        dense = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
    for h in handles:
        h.remove()
    norms = {i: (outputs[i] - inputs[i]).float().norm(dim=-1) for i in checked}
    result = {}
    for i in checked:
        for capacity in (0.5, 0.125):
            chosen = select_tokens(norms[i], capacity_tokens(capacity, ids.shape[1]), keep_first=keep_first)
            keep = torch.zeros(ids.shape, dtype=torch.bool).scatter_(1, chosen, True)[..., None]

            def masked(block, args, kwargs, out, _keep=keep):
                y = out[0] if isinstance(out, tuple) else out
                y = torch.where(_keep, y, args[0] if args else kwargs["hidden_states"])
                return (y, *out[1:]) if isinstance(out, tuple) else y

            handle = blocks[i].register_forward_hook(masked, with_kwargs=True)
            full_context = mean_loss(model, ids) - dense
            handle.remove()
            route(model, [capacity if j == i else 1.0 for j in range(len(blocks))], keep_first)
            _, hooks = with_scores(blocks, [i], lambda j, b, _i=i: norms[_i])
            routed = mean_loss(model, ids) - dense
            for h in hooks:
                h.remove()
            modify.revert(model)
            result[f"{i}@{capacity:g}"] = {"routed": routed, "full_context": full_context}
            print(f"block {i} at {capacity:g}: routed {routed:+.3f} nats, full attention context {full_context:+.3f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", help="a PLAN.json from 'modify calibrate' (default: calibrate here)")
    parser.add_argument("--tokens", type=int, default=16384, help="calibration tokens (plays A–L)")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens (plays M–Z)")
    parser.add_argument("--budgets", default="0.75,0.8,0.85,0.9,0.95", help="budgets for the sweep")
    parser.add_argument("--router-lr", default="1e-3,1e-4", help="learning rates of the router training")
    parser.add_argument("--check-blocks", default="3,5,12,17,25", help="blocks of the attention-context check")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)

    model, tokenizer = load_smollm2("bfloat16")
    for p in model.parameters():
        p.requires_grad_(False)
    _, stack = find_block_stack(model)
    blocks, n, embeddings = list(stack), len(stack), model.get_input_embeddings()
    calib_files, eval_files = shakespeare_split()
    windows, data = token_windows(tokenizer, calib_files, 512, args.tokens)
    held_out, _ = token_windows(tokenizer, eval_files, 512, args.eval_tokens)
    if args.plan:
        cal, _ = load_plan(args.plan)
    else:
        cal = calibrate(model, windows, data, CalibrationSettings(tokens=args.tokens))
    seq_len, grid = cal.settings["seq_len"], sorted(cal.settings["grid"], reverse=True)
    keep_first = cal.settings["keep_first"]

    dense = mean_loss(model, held_out)
    gram, moments = target_statistics(model, blocks, windows, embeddings)
    fitted = {t: {i: fit_router(gram[i], moments[t][i]) for i in range(n)} for t in TARGETS}
    oracle_grads = first_order_oracle(model, blocks, cal.routed, held_out, embeddings)
    costs = grid_costs(model, sorted({*grid, 0.75}, reverse=True), seq_len)
    context = context_check(model, blocks, windows[:BATCH], [int(b) for b in args.check_blocks.split(",")], keep_first)
    rows: dict[str, float] = {}

    def measure(name: str, before: Callable[[int], None] = lambda b: None) -> None:
        rows[name] = math.exp(mean_loss(model, held_out, before) - dense)
        print(f"{name:<62} {rows[name]:6.2f}x", flush=True)

    routes = ", ".join(f"{i}:{cal.capacities[i]:g}" for i in cal.routed)
    print(f"plan {routes} (cost {cal.cost_ratio:.3f}); dense held-out perplexity {math.exp(dense):.2f}")
    routed = route(model, cal.capacities, keep_first)
    load_routers(blocks, routed, None)
    measure("zero routers (first k tokens)")
    shared = torch.rand(len(held_out), held_out.shape[1])
    draws = {
        "random, each block its own draw": {i: torch.rand_like(shared) for i in routed},
        "random, one draw for all blocks": {i: shared for i in routed},
    }
    for name, draw in draws.items():
        setter, handles = with_scores(blocks, routed, lambda i, b, _d=draw: _d[i][b * BATCH : (b + 1) * BATCH])
        measure(name, setter)
        for h in handles:
            h.remove()
    labels = {
        "log_norm": "ridge fit to log ‖Δ‖ (calibration's routers)",
        "first_order": "ridge fit to −g·Δ",
        "fisher": "ridge fit to log (g_s·Δ)², labels sampled from the model",
    }
    for t in TARGETS:
        load_routers(blocks, routed, fitted[t])
        measure(labels[t])
    handles = oracle_norm(blocks, routed)
    measure("oracle ‖Δ‖ on the routed model's inputs (not a router)")
    for h in handles:
        h.remove()
    setter, handles = with_scores(blocks, routed, lambda i, b: oracle_grads[b][i])
    measure("oracle −g·Δ on the evaluation text (reads labels: a bound)", setter)
    for h in handles:
        h.remove()
    for lr in (float(x) for x in args.router_lr.split(",")):
        load_routers(blocks, routed, fitted["log_norm"])
        train_routers(model, blocks, routed, windows, lr)
        measure(f"log ‖Δ‖ fit, then routers trained 1 epoch (lr {lr:g})")
    thin = [1.0, 1.0] + [0.75] * (n - 2)
    load_routers(blocks, route(model, thin, keep_first), fitted["log_norm"])
    measure(f"another plan: 0.75 on blocks 2-{n - 1} (cost {plan_cost(thin, costs):.3f}), log ‖Δ‖ routers")

    tables = [{c: cal.sensitivity[str(i)][f"{c:g}"] for c in grid} for i in range(n)]
    sweep = {}
    for budget in (float(b) for b in args.budgets.split(",")):
        plan = plan_under_budget(tables, costs, budget)
        routed = route(model, list(plan.capacities), keep_first)
        load_routers(blocks, routed, fitted["log_norm"])
        sweep[budget] = math.exp(mean_loss(model, held_out) - dense)
        print(f"budget {budget:g}: {len(routed)} blocks routed, cost {plan.cost_ratio:.3f}, {sweep[budget]:.2f}x dense")
    if args.json:
        with open(args.json, "w") as f:
            record = {"plan": cal.capacities, "data": data, "rows": rows, "budgets": sweep, "context_check": context}
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
