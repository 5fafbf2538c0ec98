"""vipo-trl: preference optimization (Poly-DPO, Diffusion-DPO, MaPO, KTO) for text-to-image and text-to-video
diffusion and flow models."""

from __future__ import annotations

from ._version import __version__
from .utils import lazy_exports

# Imported on first use, so `vipo-trl --help` and `import vipo_trl` do not pay for torch, diffusers and transformers.
_EXPORTS = {
    "DenoisingErrors": ".losses",
    "LossOutput": ".losses",
    "available_losses": ".losses",
    "get_loss": ".losses",
    "register_loss": ".losses",
    "PolyDPOConfig": ".trainer",
    "PolyDPOTrainer": ".trainer",
    "build_latent_cache": ".trainer",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __dir__() -> list[str]:
    return __all__


__getattr__ = lazy_exports(__name__, _EXPORTS)
