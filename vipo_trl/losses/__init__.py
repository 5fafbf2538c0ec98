"""Preference losses over per-sample denoising errors, and the registry that names them."""

from . import dpo, kto, mapo, sft  # noqa: F401  (registers the built-in losses)
from .dpo import implicit_rewards, preference_logits
from .registry import DenoisingErrors, LossOutput, LossSpec, available_losses, get_loss, register_loss

#: The losses that ship with vipo-trl (registered above).
BUILTIN_LOSSES = frozenset(available_losses())
#: The `PolyDPOConfig` fields each built-in loss reads besides `beta` (the model card lists those of the run's losses).
LOSS_CONFIG_FIELDS = {
    "poly_dpo": ("poly_alpha",),
    "robust": ("label_smoothing",),
    "mapo": ("mapo_beta", "mapo_snr", "mapo_margin_scale"),
    "kto": ("kto_desirable_weight", "kto_undesirable_weight"),
}

__all__ = [
    "BUILTIN_LOSSES",
    "LOSS_CONFIG_FIELDS",
    "DenoisingErrors",
    "LossOutput",
    "LossSpec",
    "available_losses",
    "get_loss",
    "implicit_rewards",
    "preference_logits",
    "register_loss",
]
