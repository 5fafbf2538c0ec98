"""SD3 / SD3.5 (`StableDiffusion3Pipeline`): MMDiT transformer, rectified flow, CLIP-L + CLIP-G (+ optional T5)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from torch import nn

from .base import DiffusionFamily, DiffusionOptions
from .objectives import FlowMatchingObjective
from .registry import register_family


@register_family
class StableDiffusion3Family(FlowMatchingObjective, DiffusionFamily):
    """SD3 and SD3.5: flow matching on VAE latents `(z - shift_factor) * scaling_factor`; the transformer reads the
    joint CLIP/T5 sequence and the pooled CLIP embeddings. With `drop_t5_text_encoder=True` T5 is not loaded and its
    part of the sequence is zeros, exactly as `StableDiffusion3Pipeline(text_encoder_3=None)` does at inference."""

    pipeline_class = StableDiffusion3Pipeline
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    recommended_beta = 100.0
    bucket_divisibility = 16
    denoiser_name = "transformer"
    frozen_component_names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")

    def __init__(
        self, pipeline: StableDiffusion3Pipeline, options: DiffusionOptions | None = None, vae_config: Any = None
    ):
        super().__init__(pipeline, options, vae_config)
        self._init_flow(pipeline.scheduler)

    @classmethod
    def pipeline_load_kwargs(cls, options: DiffusionOptions) -> dict[str, Any]:
        return {"text_encoder_3": None, "tokenizer_3": None} if options.drop_t5_text_encoder else {}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts,
            prompts,
            prompts,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            **self.sequence_length_kwargs(),
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, network: nn.Module, noisy_input, timesteps, conditioning, dtype) -> torch.Tensor:
        return network(
            hidden_states=noisy_input.to(dtype),
            timestep=timesteps,
            encoder_hidden_states=conditioning["encoder_hidden_states"].to(dtype),
            pooled_projections=conditioning["pooled_projections"].to(dtype),
            return_dict=False,
        )[0]
