"""Diffusion-DPO and Poly-DPO.

Convention used across vipo-trl: the implicit reward of a sample is `-0.5 * beta * (e - e_ref)`, where `e` is
the policy's denoising error and `e_ref` the reference's, so

    logits = -0.5 * beta * ((e_w - e_l) - (e_ref_w - e_ref_l))

diffusers' SD1.5 LoRA example writes `beta' * (ref_diff - model_diff)` with `beta' = 2500`: that is `beta = 5000`
here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .registry import DenoisingErrors, LossOutput, register_loss


def implicit_rewards(errors: DenoisingErrors, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards `-0.5 * beta * (e - e_ref)` of chosen and rejected, each of shape `[B]`."""
    if not errors.has_reference:
        raise ValueError("Implicit rewards need the reference model's errors (ref_chosen, ref_rejected).")
    chosen = -0.5 * beta * (errors.policy_chosen - errors.ref_chosen)
    rejected = -0.5 * beta * (errors.policy_rejected - errors.ref_rejected)
    return chosen, rejected


def preference_logits(errors: DenoisingErrors, beta: float) -> torch.Tensor:
    """The Diffusion-DPO inside term, `[B]`: positive when the policy prefers the chosen sample more than the
    reference does."""
    chosen, rejected = implicit_rewards(errors, beta)
    return chosen - rejected


@register_loss("diffusion_dpo", needs_reference=True)
def diffusion_dpo_loss(errors: DenoisingErrors, config: Any) -> LossOutput:
    """Diffusion-DPO: `mean(-logsigmoid(logits))`.

    Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization", CVPR 2024
    (arXiv:2311.12908), as in diffusers' `diffusion_dpo` research example.
    """
    logits = preference_logits(errors, config.beta)
    return LossOutput(loss=-F.logsigmoid(logits).mean())


# The ViPO paper calls Diffusion-DPO "standard DPO".
register_loss("dpo", needs_reference=True)(diffusion_dpo_loss)


@register_loss("poly_dpo", needs_reference=True)
def poly_dpo_loss(errors: DenoisingErrors, config: Any) -> LossOutput:
    """Poly-DPO: `mean(-logsigmoid(logits) + alpha * (1 - sigmoid(logits)))` with `alpha = config.poly_alpha`.

    Li et al., "ViPO: Visual Preference Optimization at Scale", ICLR 2026 (arXiv:2604.24953). The gradient in the
    logits is `-(1 - p)(1 + alpha * p)`, `p = sigmoid(logits)`: alpha > 0 up-weights pairs the model already
    ranks confidently (robust to noisy, conflicting labels), alpha < 0 damps them (over-simple data), and
    alpha = 0 is exactly Diffusion-DPO.
    """
    logits = preference_logits(errors, config.beta)
    p = torch.sigmoid(logits)
    per_pair = -F.logsigmoid(logits) + config.poly_alpha * (1.0 - p)
    # `1 + alpha p` is the factor Poly-DPO puts on Diffusion-DPO's gradient: logged so a run shows how much of
    # alpha's effect is a learning-rate change (about 1 + alpha/2 while p stays near 0.5).
    grad_scale = 1.0 + config.poly_alpha * p.detach()
    return LossOutput(
        loss=per_pair.mean(), metrics={"poly_dpo/p_mean": p.detach().mean(), "poly_dpo/grad_scale": grad_scale.mean()}
    )


@register_loss("robust", needs_reference=True)
def robust_dpo_loss(errors: DenoisingErrors, config: Any) -> LossOutput:
    """Robust DPO: `mean(((1 - eps) * -logsigmoid(logits) + eps * logsigmoid(-logits)) / (1 - 2 * eps))` with
    `eps = config.label_smoothing`, the rate at which labels are assumed flipped.

    Chowdhury et al., "Provably Robust DPO: Aligning Language Models with Noisy Feedback", ICML 2024
    (arXiv:2403.00409), as TRL's `loss_type="robust"` with its `label_smoothing`: an unbiased estimate of the loss on
    clean labels when each label is flipped with probability eps (conservative DPO, the label-smoothed form, stops
    pushing a pair once `sigmoid(logits)` reaches `1 - eps` instead). Unlike Diffusion-DPO it is not bounded below
    for eps > 0. `eps = 0` is Diffusion-DPO.
    """
    logits = preference_logits(errors, config.beta)
    eps = getattr(config, "label_smoothing", 0.0)
    per_pair = ((1.0 - eps) * -F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)
    return LossOutput(loss=per_pair.mean())


@register_loss("hinge", needs_reference=True)
def hinge_loss(errors: DenoisingErrors, config: Any) -> LossOutput:
    """Hinge (SLiC-style) preference loss: `mean(relu(1 - logits))`.

    diffusers' Diffusion-DPO example (`--loss_type hinge`) writes `relu(1 - beta_dpo * (ref_diff - model_diff))`;
    with `beta = 2 * beta_dpo` that is exactly `relu(1 - logits)` in this library's convention.
    """
    return LossOutput(loss=torch.relu(1.0 - preference_logits(errors, config.beta)).mean())


@register_loss("ipo", needs_reference=True)
def ipo_loss(errors: DenoisingErrors, config: Any) -> LossOutput:
    """IPO (Azar et al., 2023) as diffusers' Diffusion-DPO example has it (`--loss_type ipo`):
    `mean((h - 1 / (2 * beta_dpo))^2)` with `h = (e_ref_w - e_ref_l) - (e_w - e_l)`, the raw (unscaled) difference
    of error gaps. With `beta = 2 * beta_dpo` here, the target is `1 / beta`.
    """
    if not errors.has_reference:
        raise ValueError("ipo needs the reference model's errors (ref_chosen, ref_rejected).")
    h = (errors.ref_chosen - errors.ref_rejected) - (errors.policy_chosen - errors.policy_rejected)
    return LossOutput(loss=(h - 1.0 / config.beta).pow(2).mean())
