"""The two noising processes the families use: DDPM (SD 1.x/2.x, SDXL) and rectified flow (SD3, FLUX, Wan)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from .options import LOSS_WEIGHTINGS, TIMESTEP_SAMPLINGS, DiffusionOptions

__all__ = ["LOSS_WEIGHTINGS", "TIMESTEP_SAMPLINGS", "DDPMObjective", "FlowMatchingObjective", "sample_unit_interval"]


def sample_unit_interval(options: DiffusionOptions, default: str, generators: list[torch.Generator]) -> torch.Tensor:
    """One `u` in [0, 1] per generator, with the density `options.timestep_sampling` (or `default`)."""
    scheme = options.timestep_sampling or default
    return torch.cat(
        [
            compute_density_for_timestep_sampling(
                scheme, 1, options.logit_mean, options.logit_std, options.mode_scale, generator=g
            )
            for g in generators
        ]
    )


class DDPMObjective:
    """DDPM noising; the target is the noise (`epsilon`) or the velocity (`v_prediction`), as the checkpoint's scheduler
    config says. Timesteps are integers in [0, num_train_timesteps)."""

    noise_scheduler: DDPMScheduler
    options: DiffusionOptions
    default_timestep_sampling = "uniform"

    def _init_ddpm(self, scheduler_config) -> None:
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"The scheduler's prediction_type is {prediction_type!r}; supported: 'epsilon' and 'v_prediction'."
            )

    def sample_timesteps(self, generators: list[torch.Generator]) -> torch.Tensor:
        num = self.noise_scheduler.config.num_train_timesteps
        u = sample_unit_interval(self.options, self.default_timestep_sampling, generators)
        return (u * num).long().clamp(0, num - 1)

    def noisy_input_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "epsilon":
            return noisy, noise
        return noisy, self.noise_scheduler.get_velocity(latents, noise, timesteps)

    def describe(self) -> dict:
        return {**super().describe(), "prediction_type": self.noise_scheduler.config.prediction_type}


class FlowMatchingObjective:
    """Rectified flow: `x_t = (1 - sigma) * x0 + sigma * noise`, target the velocity `noise - x0`. Timesteps are the
    scheduler's `sigma * num_train_timesteps` values at indices drawn with a logit-normal (default) density, as in
    diffusers' SD3/FLUX training scripts; optional SD3 loss weighting."""

    noise_scheduler: FlowMatchEulerDiscreteScheduler
    options: DiffusionOptions
    default_timestep_sampling = "logit_normal"

    def _init_flow(self, scheduler) -> None:
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and self.options.flow_shift is None:
            self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        else:
            # e.g. Wan ships a UniPC inference scheduler; train on the flow-matching schedule with its shift.
            shift = self.options.flow_shift or scheduler.config.get("flow_shift") or scheduler.config.get("shift", 1.0)
            self.noise_scheduler = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=scheduler.config.get("num_train_timesteps", 1000), shift=shift
            )

    def sample_timesteps(self, generators: list[torch.Generator]) -> torch.Tensor:
        num = self.noise_scheduler.config.num_train_timesteps
        u = sample_unit_interval(self.options, self.default_timestep_sampling, generators)
        indices = (u * num).long().clamp(0, num - 1)
        return self.noise_scheduler.timesteps[indices]

    def sigmas_for(self, timesteps: torch.Tensor) -> torch.Tensor:
        schedule, sigmas = self._schedule_on(timesteps.device)
        indices = (schedule[None, :] == timesteps[:, None].to(schedule.dtype)).float().argmax(dim=1)
        return sigmas[indices]

    def _schedule_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # The training schedule never changes; copied to the device once, not twice a step (a copy from pageable
        # host memory makes the host wait for the GPU).
        cached = getattr(self, "_device_schedule", None)
        if cached is None or cached[0] != device:
            scheduler = self.noise_scheduler
            cached = self._device_schedule = (device, scheduler.timesteps.to(device), scheduler.sigmas.to(device))
        return cached[1], cached[2]

    def noisy_input_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.sigmas_for(timesteps).view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
        return (1.0 - sigma) * latents + sigma * noise, noise - latents

    def error_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        if self.options.loss_weighting == "none":
            return None
        return compute_loss_weighting_for_sd3(self.options.loss_weighting, self.sigmas_for(timesteps)).float()
