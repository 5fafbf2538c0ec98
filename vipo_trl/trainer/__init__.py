from .cache_builder import build_latent_cache
from .poly_dpo_config import PolyDPOConfig
from .poly_dpo_trainer import PolyDPOTrainer

__all__ = ["PolyDPOConfig", "PolyDPOTrainer", "build_latent_cache"]
