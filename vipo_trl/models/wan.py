"""Wan2.1 text-to-video (`WanPipeline`): 3-D transformer on 5-D video latents, rectified flow, UMT5 text encoder."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import WanPipeline
from torch import nn

from .base import DiffusionFamily, DiffusionOptions, to_device
from .objectives import FlowMatchingObjective
from .registry import register_family


@register_family
class WanFamily(FlowMatchingObjective, DiffusionFamily):
    """Wan2.1 T2V: videos `[B, 3, F, H, W]` (F = 4k + 1) are encoded by `AutoencoderKLWan` and normalised with the
    VAE's per-channel `latents_mean`/`latents_std`, as the pipeline un-normalises them; flow matching on the flow
    schedule with the checkpoint's `flow_shift` (or `PolyDPOConfig.flow_shift`)."""

    pipeline_class = WanPipeline
    pipeline_class_names = ("WanPipeline",)
    recommended_beta = 100.0
    bucket_divisibility = 16
    denoiser_name = "transformer"
    frozen_component_names = ("vae", "text_encoder")
    is_video = True

    def __init__(self, pipeline: WanPipeline, options: DiffusionOptions | None = None, vae_config: Any = None):
        super().__init__(pipeline, options, vae_config)
        self._init_flow(pipeline.scheduler)

    @classmethod
    def pipeline_load_kwargs(cls, options: DiffusionOptions) -> dict[str, Any]:
        return {"transformer_2": None}

    def encode_latent_distribution(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if pixel_values.ndim != 5:
            raise ValueError(
                f"Wan trains on videos [B, 3, F, H, W]; got pixel values of shape {tuple(pixel_values.shape)}. "
                "Give each row a video file, video bytes or a list of frames in the chosen and rejected columns."
            )
        return super().encode_latent_distribution(pixel_values)

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae_config
        shape = (1, config.z_dim, 1, 1, 1)
        latents_mean = to_device(torch.tensor(config.latents_mean).view(shape), latents.device)
        latents_std = to_device(torch.tensor(config.latents_std).view(shape), latents.device)
        return (latents - latents_mean) / latents_std

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipeline.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            num_videos_per_prompt=1,
            device=self.device,
            **self.sequence_length_kwargs(),
        )
        return {"encoder_hidden_states": embeds}

    def predict(self, network: nn.Module, noisy_input, timesteps, conditioning, dtype) -> torch.Tensor:
        return network(
            hidden_states=noisy_input.to(dtype),
            timestep=timesteps,
            encoder_hidden_states=conditioning["encoder_hidden_states"].to(dtype),
            return_dict=False,
        )[0]
