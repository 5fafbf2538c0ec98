"""`PolyDPOConfig`, `PolyDPOTrainer` and the latent-cache builder. Imported on first use, so reading the config (for
`--help`) does not load the trainer's dependencies."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PolyDPOConfig": ".poly_dpo_config",
    "PolyDPOTrainer": ".poly_dpo_trainer",
    "build_latent_cache": ".cache_builder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'vipo_trl.trainer' has no attribute {name!r}")
