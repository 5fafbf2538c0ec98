"""Stable Diffusion 1.x / 2.x (`StableDiffusionPipeline`): UNet, one CLIP text encoder, epsilon or v-prediction."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from .base import DiffusionFamily, DiffusionOptions, UNetLoraKeys
from .objectives import DDPMObjective
from .registry import register_family


@register_family
class StableDiffusionFamily(UNetLoraKeys, DDPMObjective, DiffusionFamily):
    """SD 1.x and 2.x: DDPM noising of VAE latents scaled by `scaling_factor`; the target follows the scheduler's
    `prediction_type` (SD 2.x 768px checkpoints use `v_prediction`)."""

    pipeline_class = StableDiffusionPipeline
    pipeline_class_names = ("StableDiffusionPipeline",)
    recommended_beta = 2000.0
    denoiser_name = "unet"
    frozen_component_names = ("vae", "text_encoder")

    def __init__(
        self, pipeline: StableDiffusionPipeline, options: DiffusionOptions | None = None, vae_config: Any = None
    ):
        super().__init__(pipeline, options, vae_config)
        self._init_ddpm(pipeline.scheduler.config)

    @classmethod
    def pipeline_load_kwargs(cls, options: DiffusionOptions) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipeline.encode_prompt(
            prompts, self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds}

    def predict(self, network: nn.Module, noisy_input, timesteps, conditioning, dtype) -> torch.Tensor:
        hidden = conditioning["encoder_hidden_states"].to(dtype)
        return network(noisy_input.to(dtype), timesteps, encoder_hidden_states=hidden, return_dict=False)[0]
