"""modify: retrofit Mixture-of-Depths onto pretrained transformers.

    import modify
    model = modify.convert(model, capacity=0.125, layers="every-other")
"""

from __future__ import annotations

from modify.api import BlockInfo, convert, find_blocks, revert, routing_disabled
from modify.config import MoDConfig
from modify.errors import UnsupportedModelError
from modify.flops import FlopCount, flops

__version__ = "0.1.0"

__all__ = [
    "BlockInfo",
    "FlopCount",
    "MoDConfig",
    "UnsupportedModelError",
    "__version__",
    "convert",
    "find_blocks",
    "flops",
    "revert",
    "routing_disabled",
]
