"""Decoding images, frame lists and videos from the forms preference datasets hold them in, and the paired
transform."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch
from PIL import Image

from .video import decode_video, looks_like_video

Media = Image.Image | list[Image.Image]

#: PIL's own decompression-bomb threshold; `PolyDPOConfig.max_image_pixels` overrides it.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class PreferenceDataError(ValueError):
    """A preference dataset cannot be used as given; the message names the row or column and the fix."""


class BadRow(PreferenceDataError):
    """One row cannot be trained on. `reason` is a short key counted in the logs (see `BAD_ROW_REASONS`)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


BAD_ROW_REASONS = ("bad_label", "empty_prompt", "undecodable", "too_large", "size_mismatch", "identical")


def encode_png(image: Image.Image) -> bytes:
    """`image` as PNG bytes: how generated images are stored in preference sets (lossless, read by `decode_image`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(value: Any, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB PIL image from a PIL image, encoded bytes, a `datasets.Image` dict (`bytes`/`path`), a file path, or an
    `[H, W, 3]` uint8 array. Raises `ValueError` with the reason; callers add the row and column. Images over
    `max_pixels` are refused before their pixels are decoded (decompression bombs)."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
        return decode_image(value["bytes"] if value.get("bytes") is not None else value["path"], max_pixels)
    elif isinstance(value, (str, os.PathLike)):
        if not os.path.isfile(value):
            cwd = os.getcwd()
            where = "" if os.path.isabs(value) else f" (relative paths are read from the working directory {cwd})"
            raise ValueError(f"no image file at {os.fspath(value)!r}{where}")
        image = Image.open(value)
    elif isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 3:
        array = np.asarray(value)
        if array.shape[-1] != 3 and array.shape[0] == 3:
            array = array.transpose(1, 2, 0)
        if array.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8 [H, W, 3], got {array.dtype} {array.shape}")
        image = Image.fromarray(array, "RGB")
    else:
        raise ValueError(f"expected a PIL image, image bytes or a file path, got {type(value).__name__}")
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ImageTooLarge(f"{image.width}x{image.height} pixels is over the limit of {max_pixels} (max_image_pixels)")
    image.load()  # decode now, so a truncated or corrupt file fails here and not deep inside the collator
    return image.convert("RGB")


class ImageTooLarge(ValueError):
    pass


def media_size(value: Any) -> tuple[int, int]:
    """`(height, width)` of an image (or a video's first frame) read from its header, without decoding pixels."""
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value["path"]
    if looks_like_video(value):
        frame = decode_video(value, num_frames=1)[0]
        return frame.height, frame.width
    if isinstance(value, (list, tuple)):
        return media_size(value[0])
    if isinstance(value, (np.ndarray, torch.Tensor)):
        shape = value.shape[-3:] if value.shape[-1] == 3 else value.shape[-2:] + (3,)
        return int(shape[0]), int(shape[1])
    if isinstance(value, Image.Image):
        return value.height, value.width
    source = io.BytesIO(bytes(value)) if isinstance(value, (bytes, bytearray, memoryview)) else value
    with Image.open(source) as image:  # lazy: reads the header only
        return image.height, image.width


def decode_media(
    value: Any,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    num_frames: int | None = None,
    fps: float | None = None,
) -> Media:
    """An image, or a video as a list of frames: a video file or its bytes (decoded with PyAV and sampled to
    `num_frames` at `fps`), a list of images, or a `[F, H, W, 3]` uint8 array (the first `num_frames` frames)."""
    if looks_like_video(value):
        frames = decode_video(value, num_frames=num_frames, fps=fps)
    elif isinstance(value, (list, tuple)) or (isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 4):
        if len(value) == 0:
            raise ValueError("an empty list of frames")
        if num_frames is not None and len(value) < num_frames:
            raise ValueError(f"{len(value)} frames, fewer than num_frames={num_frames}")
        frames = [decode_image(frame, max_pixels) for frame in list(value)[:num_frames]]
    else:
        return decode_image(value, max_pixels)
    if max_pixels is not None and frames[0].width * frames[0].height > max_pixels:
        raise ImageTooLarge(f"{frames[0].width}x{frames[0].height} frames are over the limit of {max_pixels}")
    return frames


def paired_transform(
    chosen: Media,
    rejected: Media,
    resolution: int | tuple[int, int],
    center_crop: bool,
    random_flip: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize, crop and flip both items of a pair identically.

    `resolution` is a side (square crops) or an aspect-ratio bucket `(height, width)`: the items are resized to cover
    it, keeping their aspect ratio, then cropped to it. Images become `[3, H, W]` tensors in [-1, 1]; videos (frame
    lists) `[3, F, H, W]`. The rejected item is brought to the chosen item's size, so one crop window fits both. The
    random crop and flip are drawn from `generator`. Also returns the original `(height, width)` and the crop's
    `(top, left)`, which SDXL conditions on.
    """
    is_video = isinstance(chosen, list)
    chosen_frames = chosen if is_video else [chosen]
    rejected_frames = rejected if isinstance(rejected, list) else [rejected]
    if len(chosen_frames) != len(rejected_frames):
        raise ValueError(f"chosen has {len(chosen_frames)} frames but rejected has {len(rejected_frames)}")

    target_h, target_w = (resolution, resolution) if isinstance(resolution, int) else resolution
    width, height = chosen_frames[0].size
    scale = max(target_w / width, target_h / height)
    new_size = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    if center_crop:
        left = (new_size[0] - target_w) // 2
        top = (new_size[1] - target_h) // 2
    else:
        left = int(torch.randint(0, new_size[0] - target_w + 1, (1,), generator=generator))
        top = int(torch.randint(0, new_size[1] - target_h + 1, (1,), generator=generator))
    box = (left, top, left + target_w, top + target_h)
    flip = random_flip and bool(torch.rand((), generator=generator) < 0.5)

    def to_tensor(frames: list[Image.Image]) -> torch.Tensor:
        out = []
        for im in frames:
            im = im.resize(new_size, Image.BILINEAR).crop(box)
            if flip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        stacked = torch.stack(out, dim=1)  # [3, F, res, res]
        return stacked.contiguous() if is_video else stacked[:, 0].contiguous()

    return to_tensor(chosen_frames), to_tensor(rejected_frames), (height, width), (top, left)
