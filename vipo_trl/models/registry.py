"""Lookup from a pipeline's `model_index.json` (or a loaded pipeline's class) to its model family."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from ..utils import Registry
from .base import DiffusionFamily, DiffusionOptions

#: `model_index.json` pipeline class names -> the family that trains them.
_FAMILIES: Registry[type[DiffusionFamily]] = Registry("model family for pipeline")


def register_family(cls: type[DiffusionFamily]) -> type[DiffusionFamily]:
    """Class decorator: route the `model_index.json` class names in `cls.pipeline_class_names` to `cls`."""
    for name in cls.pipeline_class_names:
        _FAMILIES.register(name, cls, override=True)  # a user's family may take over a pipeline from a built-in one
    return cls


BUILTIN_FAMILY_MODULES = ("stable_diffusion", "stable_diffusion_xl", "stable_diffusion_3", "flux", "wan")


def _import_builtin_families() -> None:
    for name in BUILTIN_FAMILY_MODULES:  # each registers itself on import
        importlib.import_module(f"{__package__}.{name}")


def supported_pipelines() -> list[str]:
    """Pipeline class names that vipo-trl can train."""
    _import_builtin_families()
    return _FAMILIES.names()


def family_for_pipeline(pipeline_class_name: str) -> type[DiffusionFamily]:
    """The family class for a `model_index.json` `_class_name`, or a clear error."""
    _import_builtin_families()
    if pipeline_class_name in _FAMILIES:
        return _FAMILIES.get(pipeline_class_name)
    raise ValueError(
        f"Unsupported model family: its model_index.json names the pipeline {pipeline_class_name!r}. "
        f"vipo-trl can train: {', '.join(supported_pipelines())}."
    )


def family_from_pipeline(pipeline: Any, options: DiffusionOptions | None = None) -> DiffusionFamily:
    """The family of an already loaded `DiffusionPipeline`, wrapping it as it is (components, dtypes, fused LoRAs)."""
    family = family_for_pipeline(type(pipeline).__name__)(pipeline, options)
    family.name_or_path = getattr(pipeline, "name_or_path", None) or pipeline.config.get("_name_or_path") or None
    return family


def load_family(
    name_or_path: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    frozen_dtype: torch.dtype = torch.float32,
    options: DiffusionOptions | None = None,
    encoders: bool = True,
    quantization_config: Any = None,
) -> DiffusionFamily:
    """Read `model_index.json` of a hub id or local diffusers folder and load the matching family."""
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(name_or_path, revision=revision)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"Cannot read model_index.json of model {name_or_path!r}: {exc}. Pass a diffusers pipeline folder or a "
            "hub id of one (with `revision` if it is not on the main branch)."
        ) from exc
    cls = family_for_pipeline(index.get("_class_name", "<missing _class_name>"))
    return cls.from_pretrained(
        name_or_path,
        revision=revision,
        variant=variant,
        frozen_dtype=frozen_dtype,
        options=options,
        encoders=encoders,
        quantization_config=quantization_config,
    )
