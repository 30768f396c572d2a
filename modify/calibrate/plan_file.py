"""Saved calibration plans: PLAN.json, the fitted routers beside it, and a chart.

``PLAN.json`` holds the calibration record (settings, data fingerprint, per-block sensitivity, the chosen
capacities, predicted and measured loss, router fit) and the source it was calibrated on (by name, size and
SHA-256, as are the data files: no local path, so a plan can be shared);
``PLAN.safetensors`` holds the fitted routers (``<block>.<name>``) and skip paths (``skip.<block>.<name>``);
``PLAN.png`` charts each block's sensitivity and capacity.
The JSON is written last, each file atomically, so a plan that is there is complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from modify.calibrate.calibration import Calibration
from modify.errors import ModifyError
from modify.io.checkpoint import atomic_file, check_parent

__all__ = ["save_plan", "load_plan", "plot_plan", "PLAN_FORMAT"]

PLAN_FORMAT = "modify-plan"
_VERSION = 1


def plot_plan(calibration: Calibration, path: Path) -> None:
    """Per block: loss increase when removed and at each grid capacity (log scale), and the chosen capacity."""
    # import time: matplotlib (about 0.4 s) loads only to draw the chart, on Agg (no display needed)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # import time: as matplotlib, once its backend is chosen

    blocks = list(range(calibration.num_blocks))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.3 * len(blocks) + 2), 6), sharex=True)
    # Pure MoD's columns ("0.5"); a skip path's ("0.5 linear-32") would crowd the chart.
    keys = [k for k in next(iter(calibration.sensitivity.values())) if k != "1" and " " not in k]
    for key in sorted(keys, key=float):
        values = [max(calibration.sensitivity[str(i)][key], 1e-4) for i in blocks]
        top.plot(blocks, values, marker="o", ms=3, label="removed" if key == "0" else f"capacity {key}")
    top.set_yscale("log")
    top.set_ylabel("loss increase (nats)")
    top.set_title(f"per-block sensitivity ({calibration.data['tokens']} calibration tokens)")
    top.legend(fontsize=7, ncol=3)
    bottom.bar(
        blocks, calibration.capacities, color=["tab:blue" if c < 1 else "lightgray" for c in calibration.capacities]
    )
    for i, (c, spec) in enumerate(zip(calibration.capacities, calibration.skip_paths)):
        label = ("removed" + (f", {spec}" if spec != "identity" else "")) if c == 0 else spec
        if c < 1 and label != "identity":
            bottom.text(i, c + 0.02, label, rotation=90, ha="center", va="bottom", fontsize=6)
    bottom.set_ylim(0, 1.05)
    bottom.set_ylabel("capacity")
    bottom.set_xlabel("block")
    bottom.set_title(
        f"plan at FLOP budget {calibration.settings['budget']:g} ({calibration.cost_ratio:.3f} of dense)\n"
        f"loss {calibration.predicted_loss_increase:+.3f} nats predicted, "
        f"{calibration.measured_loss - calibration.dense_loss:+.3f} measured",
        fontsize=9,
    )
    fig.tight_layout()
    atomic_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def save_plan(calibration: Calibration, path: Path, source: dict[str, Any]) -> Path:
    """Write PLAN.json with its routers (PLAN.safetensors) and chart (PLAN.png); returns the JSON's path."""
    path = Path(path).expanduser().resolve()
    check_parent(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    routers_path, chart_path = path.with_suffix(".safetensors"), path.with_suffix(".png")
    tensors = {f"{i}.{name}": t.contiguous() for i, values in calibration.routers.items() for name, t in values.items()}
    tensors.update(
        {f"skip.{i}.{name}": t.contiguous() for i, values in calibration.skips.items() for name, t in values.items()}
    )
    atomic_file(routers_path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    plot_plan(calibration, chart_path)
    record = {
        "format": PLAN_FORMAT,
        "version": _VERSION,
        "source": source,
        "routers": routers_path.name,
        **calibration.to_dict(),
    }
    atomic_file(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n"))
    return path


def load_plan(path: Path) -> tuple[Calibration, dict[str, Any]]:
    """Read a saved plan: the calibration (routers included) and the source it was made on."""
    path = Path(path).expanduser()
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModifyError(f"plan {path} does not exist; write one with 'modify calibrate'") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModifyError(f"plan {path} is not valid JSON ({exc}); write it again with 'modify calibrate'") from None
    if record.get("format") != PLAN_FORMAT or record.get("version", 0) > _VERSION:
        raise ModifyError(f"{path} is not a modify plan of version <= {_VERSION}; write it with 'modify calibrate'")
    routers_path = path.parent / record.pop("routers")
    try:
        tensors = load_file(str(routers_path))
    except (FileNotFoundError, OSError) as exc:
        raise ModifyError(
            f"the plan's routers {routers_path} can't be read ({exc}); keep them beside the plan"
        ) from None
    source = record.pop("source")
    for key in ("format", "version"):
        record.pop(key)
    routers: dict[int, dict[str, torch.Tensor]] = {}
    skips: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        target = skips if key.startswith("skip.") else routers
        index, name = key.removeprefix("skip.").split(".", 1)
        target.setdefault(int(index), {})[name] = tensor
    return Calibration(**record, routers=routers, skips=skips), source
