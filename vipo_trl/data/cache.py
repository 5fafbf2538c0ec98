"""A cache of VAE latent distributions and prompt embeddings, so training need not re-encode (nor load the encoders).

Layout of a cache folder:

    manifest.json              model, revision, resolution, preprocessing, shards, counts; `complete` when done
    shard-00000.safetensors    per pair: row_index, latent_mean/std of chosen and rejected, cond.<key> embeddings
    empty_prompt.safetensors   the conditioning of no prompt, for `proportion_empty_prompts`

What is fixed at cache time: the resize, the crop and the flip (those of epoch 0, drawn from the same per-row seed
as training on raw data uses) and the prompt embeddings. What stays random at training time: the VAE latent sample
(the cache keeps the distribution's mean and std, not one sample), the noise and the timestep. So in the first
epoch, training from the cache gives exactly the losses of training on the raw pairs with the same seed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import Dataset as TorchDataset

from .images import PreferenceDataError

MANIFEST_NAME = "manifest.json"
CACHE_FORMAT_VERSION = 1
EMPTY_PROMPT_NAME = "empty_prompt.safetensors"
LATENT_KEYS = ("latent_mean_chosen", "latent_std_chosen", "latent_mean_rejected", "latent_std_rejected")


def is_latent_cache(path: Any) -> bool:
    """Whether `path` is a folder holding a latent cache manifest."""
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, MANIFEST_NAME))


def empty_prompt_file(path: str | os.PathLike) -> str:
    """The cache's `empty_prompt.safetensors`, or an error naming the fix when a cache built by an older version has
    none (what `proportion_empty_prompts` trains on)."""
    file = os.path.join(path, EMPTY_PROMPT_NAME)
    if not os.path.isfile(file):
        raise PreferenceDataError(
            f"The latent cache in {path} has no {EMPTY_PROMPT_NAME} (it was built by an older vipo-trl), which "
            "proportion_empty_prompts needs: run build_latent_cache (or `vipo-trl cache`) on it again with the same "
            "arguments to add it (nothing else is re-encoded), or set proportion_empty_prompts=0."
        )
    return file


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    with open(os.path.join(path, MANIFEST_NAME)) as f:
        return json.load(f)


def write_json_atomic(path: str, payload: dict[str, Any]) -> None:
    directory = os.path.dirname(path)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
        json.dump(payload, f, indent=2)
        tmp = f.name
    os.replace(tmp, path)


@dataclass
class _Shard:
    path: str
    offset: int
    num_pairs: int
    categories: list[Any]
    bucket: Any


class LatentCacheDataset(TorchDataset):
    """A finished latent cache as a map-style dataset of per-pair tensors (opened lazily, memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        if not is_latent_cache(path):
            raise PreferenceDataError(f"{path} is not a latent cache folder (no {MANIFEST_NAME}).")
        self.path = str(path)
        self.manifest = read_manifest(path)
        if not self.manifest.get("complete"):
            raise PreferenceDataError(
                f"The latent cache in {path} is incomplete ({self.manifest.get('num_pairs', 0)} pairs so far): run "
                "build_latent_cache (or `vipo-trl cache`) again with the same arguments to finish it."
            )
        self.settings = self.manifest["settings"]
        self.shards: list[_Shard] = []
        offset = 0
        for shard in self.manifest["shards"]:
            file = os.path.join(self.path, shard["file"])
            with safe_open(file, "pt") as f:
                categories = json.loads((f.metadata() or {}).get("categories", "[]"))
            bucket = tuple(shard["bucket"]) if shard.get("bucket") else None
            self.shards.append(_Shard(file, offset, shard["num_pairs"], categories, bucket))
            offset += shard["num_pairs"]
        self._open: dict[str, Any] = {}

    def empty_prompt_conditioning(self) -> dict[str, torch.Tensor]:
        """The conditioning of no prompt the cache was built with (one row; see `proportion_empty_prompts`)."""
        return load_file(empty_prompt_file(self.path))

    def __len__(self) -> int:
        return self.manifest["num_pairs"]

    def set_epoch(self, epoch: int) -> None:
        pass  # the augmentation was fixed at cache time

    def categories(self) -> list[str]:
        return sorted({str(c) for shard in self.shards for c in shard.categories if c is not None})

    def category_of_rows(self) -> list[str]:
        return [str(c) for shard in self.shards for c in shard.categories]

    def bucket_of_rows(self) -> list[Any]:
        return [shard.bucket for shard in self.shards for _ in range(shard.num_pairs)]

    @property
    def uses_buckets(self) -> bool:
        return bool(self.settings.get("aspect_ratio_buckets"))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = next(s for s in self.shards if s.offset <= index < s.offset + s.num_pairs)
        handle = self._open.get(shard.path)
        if handle is None:
            handle = self._open[shard.path] = safe_open(shard.path, "pt")
        local = index - shard.offset
        item = {key: handle.get_slice(key)[local] for key in handle.keys()}
        item["row_index"] = int(item["row_index"])
        item["category"] = shard.categories[local] if shard.categories else None
        return item

    def __getstate__(self) -> dict[str, Any]:
        # File handles do not cross into DataLoader workers; each worker reopens its shards.
        return {**self.__dict__, "_open": {}}


class LatentCacheCollator:
    """Stacks cached pairs into the batch layout the trainer reads (`latent_*`, `conditioning`, `row_index`)."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {key: torch.stack([it[key] for it in items]) for key in LATENT_KEYS}
        cond_keys = [k for k in items[0] if k.startswith("cond.")]
        batch["conditioning"] = {k[5:]: torch.stack([it[k] for it in items]) for k in cond_keys}
        batch["row_index"] = [it["row_index"] for it in items]
        batch["categories"] = [it.get("category") for it in items]
        batch["skipped"] = []
        return batch
