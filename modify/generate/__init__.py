"""What ``generate()`` and its cache need from a converted model: following a Hugging Face key-value cache.

The per-token forward behind ``generate()`` is the routing core's (:mod:`modify.routing.ragged`), the causal
rules are selection rules (:mod:`modify.routing.rules`), and the switch into causal routing inside
``generate()`` is the model's hook (:mod:`modify.model_hooks`). This package holds how a routed block keeps
its layer of the cache (:mod:`modify.generate.cache`), and registers it with the core on import (the package
``modify`` imports it, so every use of modify has it).

May import: :mod:`modify.routing` and below; nothing imports it but the package root and the command line.
"""

from __future__ import annotations

from modify.generate.cache import HISTORY_ATTR, KVCacheFollower
from modify.routing.ragged import set_cache_follower

set_cache_follower(KVCacheFollower())

__all__ = ["HISTORY_ATTR", "KVCacheFollower"]
