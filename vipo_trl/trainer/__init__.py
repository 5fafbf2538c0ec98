"""`PolyDPOConfig`, `PolyDPOTrainer` and the latent-cache builder. Imported on first use, so reading the config (for
`--help`) does not load the trainer's dependencies."""

from __future__ import annotations

from ..utils import lazy_exports

_EXPORTS = {
    "PolyDPOConfig": ".poly_dpo_config",
    "PolyDPOTrainer": ".poly_dpo_trainer",
    "build_latent_cache": ".cache_builder",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
