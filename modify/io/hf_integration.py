"""Let ``transformers.AutoModelForCausalLM.from_pretrained`` load converted checkpoints, once modify is imported.

A converted config.json carries ``"quantization_config": {"quant_method": "modify"}``. transformers' own
extension point for methods that change a model's modules around weight loading (``register_quantizer``) then
hands the model to :class:`ModifyLoader` twice: before the weights load, it adds an empty router to every
routed block so that the routers' weights load with the rest; after, it finishes the conversion with the
saved plan and removes every trace of "quantization" from the model (nothing is quantized; the model
trains and saves like any other). Without modify imported, transformers ignores the unknown method and
loads the dense model, warning about the router weights it skipped.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
from safetensors import safe_open
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from modify.api import convert
from modify.config import CONFIG_KEY, QUANT_METHOD, MoDConfig
from modify.errors import ModifyError
from modify.moe.noop import NOOP_ATTR, NoOpExpert, find_moe
from modify.routing.router import PREDICTOR_ATTR, ROUTER_ATTR, MoDPredictor, MoDRouter
from modify.routing.skip_path import SKIP_ATTR, make_skip_path

__all__ = ["QUANT_METHOD", "ModifyLoadConfig", "ModifyLoader"]  # QUANT_METHOD from modify.config


class ModifyLoadConfig(QuantizationConfigMixin):
    """The marker in config.json; the plan itself is under ``mixture_of_depths``."""

    def __init__(self, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD


class ModifyLoader(HfQuantizer):
    """Restores Mixture-of-Depths routing while transformers loads a converted checkpoint."""

    requires_calibration = False

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def _plan(self, model: Any) -> MoDConfig:
        return MoDConfig.from_dict(getattr(model.config, CONFIG_KEY))

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        plan = self._plan(model)
        keys = _check_checkpoint(plan, kwargs.get("checkpoint_files") or [])
        stack = model.get_submodule(plan.block_stack)
        hidden = model.config.get_text_config().hidden_size
        if plan.mode == "integrated":
            for i in plan.routed:
                found = find_moe(stack[i])
                if found is not None:
                    with torch.device("meta"):
                        found[1].add_module(NOOP_ATTR, NoOpExpert(hidden))
            return model
        for i, skip in zip(plan.routed, plan.skip_paths):
            # Built on the meta device like the rest of the skeleton; the checkpoint's weights fill them.
            with torch.device("meta"):
                router = MoDRouter(hidden)  # zeros: the checkpoint fills it
                if f"{plan.block_stack}.{i}.{ROUTER_ATTR}.threshold" not in keys:
                    # Saved before thresholds were weights: not expected, so the plan's value is used.
                    router.register_buffer("threshold", router.threshold, persistent=False)
                stack[i].add_module(ROUTER_ATTR, router)
                path = make_skip_path(skip, hidden, dtype=next(stack[i].parameters()).dtype)
                if path is not None:
                    stack[i].add_module(SKIP_ATTR, path)
                if plan.causal == "predictor":
                    stack[i].add_module(PREDICTOR_ATTR, MoDPredictor(hidden, plan.predictor_size))
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        self.remove_quantization_config(model)
        convert(model, plan=self._plan(model))
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def _keys(name: str) -> set[str]:
    """The tensor names one weights file holds: a safetensors header, or a pickled state dict (.bin) read onto
    the meta device, so no tensor's data is loaded."""
    if name.endswith(".safetensors"):
        with safe_open(name, framework="pt") as f:
            return set(f.keys())
    try:
        state = torch.load(name, map_location="meta", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModifyError(f"{name} is not a readable PyTorch state dict ({first}); save the model again") from None
    return set(state)


def _check_checkpoint(plan: MoDConfig, files: list[str]) -> set[str]:
    """Refuse, before loading, a checkpoint whose routers don't match its plan: a router the plan doesn't
    route would be dropped as an unexpected key, and one it routes but the files lack would start untrained;
    transformers would only warn of either. Reads the keys of safetensors and .bin files alike (a .bin's
    threshold not found here would be left an uninitialised buffer); returns them."""
    names = [str(f) for f in files if str(f).endswith((".safetensors", ".bin"))]
    if not names:
        return set()
    keys: set[str] = set()
    for name in names:
        keys.update(_keys(name))
    if plan.mode == "integrated":
        return keys
    prefix = f"{plan.block_stack}."
    saved = {int(k[len(prefix) :].split(".")[0]) for k in keys if k.startswith(prefix) and f".{ROUTER_ATTR}." in k}
    if saved - set(plan.routed):
        raise ModifyError(
            f"the checkpoint has routers in blocks {sorted(saved - set(plan.routed))} that its plan (config.json "
            f"{CONFIG_KEY}.routed = {plan.routed}) doesn't route, so they would be dropped; save it again with "
            "save_pretrained from the converted model"
        )
    if set(plan.routed) - saved:
        raise ModifyError(
            f"the checkpoint's plan routes blocks {sorted(set(plan.routed) - saved)} but its weights hold no router "
            "for them; save it again with save_pretrained from the converted model"
        )
    return keys


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(ModifyLoadConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(ModifyLoader)
