"""SDXL (`StableDiffusionXLPipeline`): UNet with two CLIP text encoders, pooled embeddings and size/crop
micro-conditioning."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from torch import nn

from .base import DiffusionFamily, DiffusionOptions, UNetLoraKeys, to_device
from .objectives import DDPMObjective
from .registry import register_family


@register_family
class StableDiffusionXLFamily(UNetLoraKeys, DDPMObjective, DiffusionFamily):
    """SDXL base: DDPM noising like SD 1.x; the UNet also reads the pooled text embedding and `add_time_ids`
    `(original height, original width, crop top, crop left, target height, target width)`, built per sample by the
    pipeline's own `_get_add_time_ids` from each image's original size and crop window."""

    pipeline_class = StableDiffusionXLPipeline
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    recommended_beta = 5000.0
    denoiser_name = "unet"
    frozen_component_names = ("vae", "text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")

    def __init__(
        self, pipeline: StableDiffusionXLPipeline, options: DiffusionOptions | None = None, vae_config: Any = None
    ):
        super().__init__(pipeline, options, vae_config)
        self._init_ddpm(pipeline.scheduler.config)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    @torch.no_grad()
    def encode_conditioning(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        pipe = self.pipeline
        conditioning = self.encode_prompts(batch["prompts"])
        dtype = conditioning["encoder_hidden_states"].dtype
        height, width = batch["pixel_values_chosen"].shape[-2:]
        projection_dim = pipe.text_encoder_2.config.projection_dim
        time_ids = torch.cat(
            [
                pipe._get_add_time_ids(
                    tuple(size), tuple(crop), (height, width), dtype, text_encoder_projection_dim=projection_dim
                )
                for size, crop in zip(batch["original_sizes"], batch["crop_top_lefts"])
            ]
        )
        conditioning["time_ids"] = to_device(time_ids, self.device)
        return conditioning

    def empty_prompt_conditioning(self) -> dict[str, torch.Tensor]:
        # With no negative prompt the SDXL pipelines guide against zeros (force_zeros_for_empty_prompt, on for the
        # SDXL base model), not against the encoded empty prompt.
        empty = self.encode_prompts([""])
        if self.pipeline.config.get("force_zeros_for_empty_prompt", False):
            empty = {key: torch.zeros_like(value) for key, value in empty.items()}
        return empty

    def predict(self, network: nn.Module, noisy_input, timesteps, conditioning, dtype) -> torch.Tensor:
        added = {"text_embeds": conditioning["text_embeds"].to(dtype), "time_ids": conditioning["time_ids"].to(dtype)}
        return network(
            noisy_input.to(dtype),
            timesteps,
            encoder_hidden_states=conditioning["encoder_hidden_states"].to(dtype),
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
