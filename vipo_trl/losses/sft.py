"""Supervised fine-tuning on the chosen sample (the ViPO paper's SFT stage, and a baseline)."""

from __future__ import annotations

from typing import Any

from .registry import DenoisingErrors, LossOutput, register_loss


@register_loss("sft", needs_reference=False, needs_rejected=False)
def sft_loss(errors: DenoisingErrors, config: Any) -> LossOutput:
    """The plain denoising loss on the chosen sample only: `mean(e_w)`. The rejected sample is not read (nor
    encoded, nor run, when `sft` is the only loss).

    Used as the first stage in Li et al., "ViPO: Visual Preference Optimization at Scale", ICLR 2026, and as a
    regulariser beside a preference loss (`loss_type=["poly_dpo", "sft"]`).
    """
    return LossOutput(loss=errors.policy_chosen.mean())
