"""Sampling from a pipeline with one seeded generator per image: the one generation helper behind evaluation, the
embedded default's synthetic sets and the training callback."""

from __future__ import annotations

import textwrap
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
    **pipeline_kwargs: Any,
) -> list[Any]:
    """One image per (prompt, seed); each image's noise comes from its own seeded generator, so base and aligned
    pipelines start from the same noise. `progress` titles a progress bar over the images. A video pipeline (Wan)
    gives one list of frames per (prompt, seed) instead. `pipeline_kwargs` go to every call (e.g. `height`,
    `num_frames`)."""
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
            output_type="pil",
            **pipeline_kwargs,
        )
        if hasattr(out, "frames"):  # a video pipeline: one list of PIL frames per sample
            samples = [list(frames) for frames in out.frames]
        elif hasattr(out, "images"):
            samples = list(out.images)
        else:
            raise ValueError(f"{type(pipe).__name__} returns neither images nor frames; it cannot be sampled here.")
        images += samples
        bar.update(len(samples))
    bar.close()
    return images


#: Space for row names on the left and prompt captions above the tiles of `labelled_grid`.
LABEL_WIDTH, CAPTION_HEIGHT = 64, 30


def labelled_grid(rows: dict[str, list[Image.Image]], captions: Sequence[str] = (), cell: int = 96) -> Image.Image:
    """Rows of images named on the left (e.g. "base", "aligned"), columns captioned with their prompts (wrapped to
    two lines) above; small images are enlarged without smoothing."""
    from PIL import ImageDraw

    width = LABEL_WIDTH + cell * max(len(images) for images in rows.values())
    grid = Image.new("RGB", (width, CAPTION_HEIGHT + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(4, cell // 6)  # the default bitmap font is about 6 px per character
    for x, caption in enumerate(captions):
        lines = textwrap.wrap(caption, chars)[:2]  # at word boundaries
        for line, text in enumerate(lines):
            draw.text((LABEL_WIDTH + x * cell + 2, 2 + 13 * line), text, fill="black")
    for y, (label, images) in enumerate(rows.items()):
        top = CAPTION_HEIGHT + y * cell
        draw.text((4, top + cell // 2 - 6), label, fill="black")
        for x, image in enumerate(images):
            resample = Image.NEAREST if image.width < cell else Image.BICUBIC
            grid.paste(image.convert("RGB").resize((cell, cell), resample), (LABEL_WIDTH + x * cell, top))
    return grid
