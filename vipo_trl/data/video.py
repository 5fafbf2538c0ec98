"""Video decoding with PyAV: files or bytes (mp4, webm, ...) to a list of RGB frames, sampled in time."""

from __future__ import annotations

import io
import os
from typing import Any

from PIL import Image

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")


def looks_like_video(value: Any) -> bool:
    """Whether `value` is a video file path or encoded video bytes (mp4/mov `ftyp` box, webm/mkv EBML header)."""
    if isinstance(value, dict):
        return looks_like_video(value.get("bytes")) or looks_like_video(value.get("path"))
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value).lower().endswith(VIDEO_EXTENSIONS)
    if isinstance(value, (bytes, bytearray, memoryview)):
        head = bytes(value[:12])
        return head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3"
    return False


class MissingDependency(ImportError):
    """An optional dependency the input needs is not installed; the message names the extra to install. Not a bad
    row: every row of the kind would fail the same way."""


def decode_video(value: Any, num_frames: int | None = None, fps: float | None = None) -> list[Image.Image]:
    """RGB frames of a video given as a path, bytes or a `{"bytes", "path"}` dict.

    With `fps`, frames are sampled at times `k / fps` (the first frame at or after each time); without it, consecutive
    frames at the video's own rate. `num_frames` frames are returned (all of them when `None`). A video too short for
    `num_frames` raises `ValueError`.
    """
    try:
        import av
    except ImportError as exc:  # av comes with the video extra
        raise MissingDependency("Decoding video files needs PyAV: pip install 'vipo-trl[video]'.") from exc
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value["path"]
    source = io.BytesIO(bytes(value)) if isinstance(value, (bytes, bytearray, memoryview)) else os.fspath(value)
    if isinstance(source, str) and not os.path.isfile(source):
        raise ValueError(f"no video file at {source!r}")

    frames: list[Image.Image] = []
    with av.open(source) as container:
        stream = container.streams.video[0]
        next_time = 0.0
        for frame in container.decode(stream):
            if fps is not None:
                time = float(frame.time) if frame.time is not None else len(frames) / float(stream.average_rate)
                if time + 1e-6 < next_time:
                    continue
                next_time += 1.0 / fps
            frames.append(frame.to_image().convert("RGB"))
            if num_frames is not None and len(frames) == num_frames:
                break
    if not frames:
        raise ValueError("the video has no decodable frame")
    if num_frames is not None and len(frames) < num_frames:
        rate = f" at {fps} fps" if fps else ""
        raise ValueError(f"the video gives {len(frames)} frames{rate}, fewer than num_frames={num_frames}")
    return frames


def encode_video(frames: list[Image.Image], fps: int = 16) -> bytes:
    """`frames` as mp4 bytes (H.264, yuv420p; odd sizes are padded by one pixel, as the codec needs even sides)."""
    try:
        import av
    except ImportError as exc:  # av comes with the video extra
        raise MissingDependency("Encoding video files needs PyAV: pip install 'vipo-trl[video]'.") from exc
    if not frames:
        raise ValueError("encode_video: no frames.")
    width, height = frames[0].size
    width, height = width + width % 2, height + height % 2
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18"}
        for image in frames:
            canvas = Image.new("RGB", (width, height))
            canvas.paste(image.convert("RGB"))
            for packet in stream.encode(av.VideoFrame.from_image(canvas)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()
