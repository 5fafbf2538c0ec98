"""Training-time choices of the diffusion process, kept free of heavy imports so the config (and `--help`) can
load without diffusers."""

from __future__ import annotations

from dataclasses import dataclass

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


@dataclass
class DiffusionOptions:
    """Training-time choices a family reads; `PolyDPOConfig` fills them (see its docstring)."""

    timestep_sampling: str | None = None  # None: the family's default
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_weighting: str = "none"
    guidance_scale: float = 3.5
    drop_t5_text_encoder: bool = False
    flow_shift: float | None = None
    max_sequence_length: int | None = None  # None: the pipeline's default
