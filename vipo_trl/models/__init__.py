"""Model families, one module each, and the lookup from `model_index.json` to a family. Imported on first use:
the families need diffusers, which the config and `--help` do not."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DiffusionFamily": ".base",
    "DiffusionOptions": ".options",
    "FluxFamily": ".flux",
    "StableDiffusion3Family": ".stable_diffusion_3",
    "StableDiffusionFamily": ".stable_diffusion",
    "StableDiffusionXLFamily": ".stable_diffusion_xl",
    "WanFamily": ".wan",
    "family_for_pipeline": ".registry",
    "family_from_pipeline": ".registry",
    "load_family": ".registry",
    "register_family": ".registry",
    "supported_pipelines": ".registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'vipo_trl.models' has no attribute {name!r}")
