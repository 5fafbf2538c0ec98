"""Preference data: schemas, decoding of images and videos, the paired transform, the collator, reading latent
caches, loading datasets and prompt sets. Depends on no model or trainer module (it receives `DataOptions`)."""

from .cache import LatentCacheCollator, LatentCacheDataset, is_latent_cache, read_manifest
from .images import BAD_ROW_REASONS, BadRow, PreferenceDataError, decode_image, decode_media, paired_transform
from .loading import load_dataset_mixture, load_preference_dataset
from .preference import (
    PICKAPIC_COLUMNS,
    DataOptions,
    PreferenceCollator,
    PreferenceColumns,
    PreferencePairs,
    StreamingPreferencePairs,
    load_pair,
    pairs_from_options,
    preference_pairs,
    resolve_columns,
)
from .prompts import BUILTIN_CATEGORIES, load_prompt_set
from .sampling import VIPO_CATEGORIES, CategoryBalancedSampler
from .video import decode_video, looks_like_video

__all__ = [
    "BAD_ROW_REASONS",
    "BUILTIN_CATEGORIES",
    "PICKAPIC_COLUMNS",
    "BadRow",
    "CategoryBalancedSampler",
    "DataOptions",
    "LatentCacheCollator",
    "LatentCacheDataset",
    "PreferenceCollator",
    "PreferenceColumns",
    "PreferenceDataError",
    "PreferencePairs",
    "StreamingPreferencePairs",
    "VIPO_CATEGORIES",
    "decode_image",
    "decode_media",
    "decode_video",
    "is_latent_cache",
    "load_pair",
    "load_dataset_mixture",
    "load_preference_dataset",
    "load_prompt_set",
    "looks_like_video",
    "paired_transform",
    "pairs_from_options",
    "preference_pairs",
    "read_manifest",
    "resolve_columns",
]
