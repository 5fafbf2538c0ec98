"""Validation images during training, as diffusers' training scripts make them (`--validation_prompts`,
`--validation_steps`): fixed prompts and seeds, the model being trained, a grid saved per step and sent to the
configured trackers."""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from ..models.generation import generate_images
from .trackers import log_images


class ValidationImagesCallback(TrainerCallback):
    """At the start of training and every `validation_steps` optimizer steps (and at the end), generate one image per
    validation prompt with the model being trained (same seed every time, so the images are comparable), save them as
    `<output_dir>/validation/step-<N>.png` and log them to TensorBoard, Weights & Biases and Trackio when those are
    in `report_to` (`trackers.log_images`). Only the main process saves and logs. It alone generates, except when the
    model is sharded (FSDP, DeepSpeed): each forward then gathers weights from every process, so every process
    generates the same images."""

    def __init__(self, trainer: Any, prompts: list[str], every: int, seed: int = 0, steps: int = 20):
        pipe = trainer.family.pipeline
        if getattr(pipe, "vae", None) is None or getattr(pipe, "text_encoder", None) is None:
            raise ValueError(
                "validation_prompts needs the pipeline's VAE and text encoder, which a latent-cache run does not "
                "load: train on the raw dataset, or drop validation_prompts."
            )
        self.trainer, self.prompts, self.every, self.seed, self.steps = trainer, list(prompts), every, seed, steps
        self.saved: list[str] = []

    def _validate(self, args: Any, state: Any) -> None:
        sharded = self.trainer.is_fsdp_enabled or self.trainer.is_deepspeed_enabled
        if not (state.is_world_process_zero or sharded):
            return
        denoiser = self.trainer.family.denoiser
        was_training = denoiser.training
        denoiser.eval()
        try:
            images = generate_images(
                self.trainer.family.pipeline,
                self.prompts,
                [self.seed] * len(self.prompts),
                num_inference_steps=self.steps,
            )
        finally:
            denoiser.train(was_training)
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step-{state.global_step}.png")
        _strip(images).save(path)
        self.saved.append(path)
        log_images(self.trainer, state.global_step, images, self.prompts)

    def on_train_begin(self, args, state, control, **kwargs):
        self._validate(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self._validate(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        if not self.every or state.global_step % self.every:
            self._validate(args, state)


def _strip(images: list[Any]) -> Any:
    from diffusers.utils import make_image_grid

    return make_image_grid(images, rows=1, cols=len(images))
