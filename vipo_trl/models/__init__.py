"""Model families, one module each, and the lookup from `model_index.json` to a family."""

from .base import DiffusionFamily, DiffusionOptions
from .flux import FluxFamily
from .registry import family_for_pipeline, family_from_pipeline, load_family, register_family, supported_pipelines
from .stable_diffusion import StableDiffusionFamily
from .stable_diffusion_3 import StableDiffusion3Family
from .stable_diffusion_xl import StableDiffusionXLFamily
from .wan import WanFamily

__all__ = [
    "DiffusionFamily",
    "DiffusionOptions",
    "FluxFamily",
    "StableDiffusion3Family",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "WanFamily",
    "family_for_pipeline",
    "family_from_pipeline",
    "load_family",
    "register_family",
    "supported_pipelines",
]
