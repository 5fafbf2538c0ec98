"""FLUX.1 (`FluxPipeline`): transformer on packed 2x2 latent patches, rectified flow, CLIP pooled + T5 sequence."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxPipeline
from torch import nn

from .base import DiffusionFamily, DiffusionOptions
from .objectives import FlowMatchingObjective
from .registry import register_family


@register_family
class FluxFamily(FlowMatchingObjective, DiffusionFamily):
    """FLUX.1 [dev]/[schnell]: latents are packed into 2x2 patches with image position ids, as the pipeline does; a
    guidance-distilled transformer (`guidance_embeds=True`, FLUX.1-dev) gets `guidance_scale` as its guidance input.
    The prediction is unpacked back to the latent shape, so the error is the same mean over all latent elements."""

    pipeline_class = FluxPipeline
    pipeline_class_names = ("FluxPipeline",)
    recommended_beta = 100.0
    bucket_divisibility = 16
    denoiser_name = "transformer"
    frozen_component_names = ("vae", "text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    def __init__(self, pipeline: FluxPipeline, options: DiffusionOptions | None = None, vae_config: Any = None):
        super().__init__(pipeline, options, vae_config)
        self._init_flow(pipeline.scheduler)

    @classmethod
    def pipeline_load_kwargs(cls, options: DiffusionOptions) -> dict[str, Any]:
        return {"image_encoder": None, "feature_extractor": None}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompts,
            prompts,
            device=self.device,
            num_images_per_prompt=1,
            **self.sequence_length_kwargs(),
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, network: nn.Module, noisy_input, timesteps, conditioning, dtype) -> torch.Tensor:
        batch, channels, height, width = noisy_input.shape
        device = noisy_input.device
        hidden = conditioning["encoder_hidden_states"].to(dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((batch,), self.options.guidance_scale, device=device)
        out = network(
            hidden_states=pack_latents(noisy_input).to(dtype),
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=conditioning["pooled_projections"].to(dtype),
            encoder_hidden_states=hidden,
            # As FluxPipeline builds them: text ids are zeros, image ids the (row, column) of each 2x2 patch.
            txt_ids=torch.zeros(hidden.shape[1], 3, device=device, dtype=dtype),
            img_ids=self.pipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, channels, height, width)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B, (H/2)(W/2), 4C]`, the layout of `FluxPipeline._pack_latents`."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents`, in latent units (so it needs no VAE)."""
    b = packed.shape[0]
    x = packed.view(b, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, height, width)
