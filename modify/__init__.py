"""modify: retrofit Mixture-of-Depths onto pretrained transformers.

import modify
model = modify.convert(model, capacity=0.125, layers="every-other")
"""

from __future__ import annotations

from modify.api import BlockInfo, convert, find_blocks, revert, routing_disabled
from modify.calibrate.agreement import measure_agreement
from modify.config import MoDConfig
from modify.errors import UnsupportedModelError
from modify.flops import FlopCount, flops
from modify.io.checkpoint import from_pretrained, save_converted
from modify.modes import fit_thresholds, routing_mode, set_routing
from modify.removal import export_pruned, remove_blocks

__version__ = "0.1.0"

try:  # optional dependency: transformers
    # How routed blocks follow a key-value cache (registered with the routing core on import).
    import modify.generate  # noqa: F401

    # Lets AutoModelForCausalLM.from_pretrained restore the routing of converted checkpoints.
    import modify.io.hf_integration  # noqa: F401
except ImportError:  # transformers missing: the graph passes still work on plain torch models
    pass

__all__ = [
    "BlockInfo",
    "FlopCount",
    "MoDConfig",
    "UnsupportedModelError",
    "__version__",
    "convert",
    "export_pruned",
    "find_blocks",
    "fit_thresholds",
    "flops",
    "from_pretrained",
    "measure_agreement",
    "remove_blocks",
    "revert",
    "routing_disabled",
    "routing_mode",
    "save_converted",
    "set_routing",
]
