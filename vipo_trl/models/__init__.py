"""Model families, one module each, and the lookup from `model_index.json` to a family. Imported on first use:
the families need diffusers, which the config and `--help` do not."""

from __future__ import annotations

from ..utils import lazy_exports

_EXPORTS = {
    "DiffusionFamily": ".base",
    "DiffusionOptions": ".options",
    "FluxFamily": ".flux",
    "StableDiffusion3Family": ".stable_diffusion_3",
    "StableDiffusionFamily": ".stable_diffusion",
    "StableDiffusionXLFamily": ".stable_diffusion_xl",
    "WanFamily": ".wan",
    "family_for_pipeline": ".registry",
    "fuse_aligned_weights": ".generation",
    "family_from_pipeline": ".registry",
    "load_family": ".registry",
    "register_family": ".registry",
    "supported_pipelines": ".registry",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
