"""Sampling from a pipeline with one seeded generator per image: the one generation helper behind evaluation, the
embedded default's synthetic sets and the training callback."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image


def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    batch_size: int = 8,
    progress: str | None = None,
) -> list[Image.Image]:
    """One image per (prompt, seed); each image's noise comes from its own seeded generator, so base and aligned
    pipelines start from the same noise. `progress` titles a progress bar over the images."""
    from tqdm.auto import tqdm

    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    bar = tqdm(total=len(prompts), desc=progress, unit="image", disable=progress is None, leave=False)
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[chunk]]
        out = pipe(
            list(prompts[chunk]),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
        )
        if not hasattr(out, "images"):
            raise ValueError(f"{type(pipe).__name__} does not return images; eval scores text-to-image pipelines.")
        images += out.images
        bar.update(len(out.images))
    bar.close()
    return images
