"""Preference losses over per-sample denoising errors, and the registry that names them."""

from . import dpo, kto, mapo, sft  # noqa: F401  (registers the built-in losses)
from .dpo import implicit_rewards, preference_logits
from .registry import DenoisingErrors, LossOutput, LossSpec, available_losses, get_loss, register_loss

#: The losses that ship with vipo-trl (registered above), and those of them that read `label_smoothing`.
BUILTIN_LOSSES = frozenset(available_losses())
LABEL_SMOOTHING_LOSSES = frozenset({"robust"})

__all__ = [
    "BUILTIN_LOSSES",
    "LABEL_SMOOTHING_LOSSES",
    "DenoisingErrors",
    "LossOutput",
    "LossSpec",
    "available_losses",
    "get_loss",
    "implicit_rewards",
    "preference_logits",
    "register_loss",
]
