"""Scoring videos (lists of frames): any image scorer applied to frames sampled evenly in time and averaged, and a
temporal-consistency score, the mean cosine similarity of consecutive frames' CLIP image embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from .scorers import RewardScorer, get_scorer, register_scorer

Video = Sequence[Image.Image]


def sample_frames(video: Video, num_frames: int) -> list[Image.Image]:
    """`num_frames` frames spread evenly from the first to the last (all of them when the video is shorter)."""
    if not len(video):
        raise ValueError("a video with no frames cannot be scored.")
    if len(video) <= num_frames:
        return list(video)
    step = (len(video) - 1) / (num_frames - 1) if num_frames > 1 else 0
    return [video[round(k * step)] for k in range(num_frames)]


class FrameAveragedScorer(RewardScorer):
    """An image scorer applied to `num_frames` frames of each video, sampled evenly in time; the video's score is the
    mean over its frames. Used for every image scorer when the pipeline makes videos (`vipo-trl eval`, `pairs`).

    Args:
        scorer: an image scorer, or its registered name (keyword arguments go to it).
        num_frames: frames scored per video.
    """

    def __init__(self, scorer: str | RewardScorer, num_frames: int = 8, **kwargs: Any):
        self.inner = get_scorer(scorer, **kwargs) if isinstance(scorer, str) else scorer
        super().__init__(device=self.inner.device, dtype=self.inner.dtype, batch_size=self.inner.batch_size)
        self.name = self.inner.name  # a video's pickscore is still reported as pickscore
        self.num_frames = num_frames

    @torch.no_grad()
    def score(self, videos: Sequence[Video], prompts: Sequence[str]) -> torch.Tensor:
        if len(videos) != len(prompts):
            raise ValueError(f"{self.name}: got {len(videos)} videos for {len(prompts)} prompts.")
        frames = [sample_frames(video, self.num_frames) for video in videos]
        flat = [frame for video in frames for frame in video]
        per_frame = self.inner.score(flat, [p for p, video in zip(prompts, frames) for _ in video])
        return torch.stack([chunk.mean() for chunk in per_frame.split([len(v) for v in frames])])


@register_scorer("temporal_consistency")
class TemporalConsistencyScorer(RewardScorer):
    """Mean cosine similarity of consecutive frames' CLIP image embeddings (prompt ignored): 1 for a still video,
    lower for flicker and jumps. Scores videos (lists of frames).

    Args:
        model: a CLIP model (hub id or folder) whose vision tower embeds the frames.
    """

    def __init__(self, model: str = "openai/clip-vit-large-patch14", **kwargs: Any):
        super().__init__(**kwargs)
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.clip = CLIPVisionModelWithProjection.from_pretrained(model).to(self.device, self.dtype).eval()
        self.processor = CLIPImageProcessor.from_pretrained(model)

    @torch.no_grad()
    def score(self, videos: Sequence[Video], prompts: Sequence[str] | None = None) -> torch.Tensor:
        scores = []
        for video in videos:
            if len(video) < 2:
                raise ValueError("temporal_consistency needs videos of at least 2 frames.")
            embeds = []
            for start in range(0, len(video), self.batch_size):
                frames = [f.convert("RGB") for f in video[start : start + self.batch_size]]
                pixels = self.processor(frames, return_tensors="pt").pixel_values.to(self.device, self.dtype)
                embeds.append(self.clip(pixel_values=pixels).image_embeds.float())
            unit = torch.nn.functional.normalize(torch.cat(embeds), dim=-1)
            scores.append((unit[1:] * unit[:-1]).sum(-1).mean())
        return torch.stack(scores).cpu() if scores else torch.zeros(0)


def is_video(sample: Any) -> bool:
    """Whether a generated sample is a video (a sequence of frames) rather than one image."""
    return isinstance(sample, (list, tuple)) and len(sample) > 0 and isinstance(sample[0], Image.Image)


def for_videos(scorer: RewardScorer, num_frames: int = 8) -> RewardScorer:
    """`scorer` as it applies to videos: video scorers as they are, image scorers averaged over sampled frames."""
    if isinstance(scorer, (TemporalConsistencyScorer, FrameAveragedScorer)):
        return scorer
    return FrameAveragedScorer(scorer, num_frames=num_frames)
