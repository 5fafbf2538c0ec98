"""A cache of VAE latent distributions and prompt embeddings, so training need not re-encode (nor load the encoders).

Layout of a cache folder:

    manifest.json              model, revision, resolution, preprocessing, shards, counts; `complete` when done
    shard-00000.safetensors    per pair: row_index, latent_mean/std of chosen and rejected, cond.<key> embeddings

What is fixed at cache time: the resize, the crop and the flip (those of epoch 0, drawn from the same per-row seed
as training on raw data uses) and the prompt embeddings. What stays random at training time: the VAE latent sample
(the cache keeps the distribution's mean and std, not one sample), the noise and the timestep. So in the first
epoch, training from the cache gives exactly the losses of training on the raw pairs with the same seed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset as TorchDataset
from tqdm.auto import tqdm

from .images import PreferenceDataError
from .preference import PreferenceCollator, PreferencePairs, pairs_from_config

MANIFEST_NAME = "manifest.json"
CACHE_FORMAT_VERSION = 1
LATENT_KEYS = ("latent_mean_chosen", "latent_std_chosen", "latent_mean_rejected", "latent_std_rejected")


def is_latent_cache(path: Any) -> bool:
    """Whether `path` is a folder holding a latent cache manifest."""
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, MANIFEST_NAME))


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    with open(os.path.join(path, MANIFEST_NAME)) as f:
        return json.load(f)


def _write_json_atomic(path: str, payload: dict[str, Any]) -> None:
    directory = os.path.dirname(path)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
        json.dump(payload, f, indent=2)
        tmp = f.name
    os.replace(tmp, path)


def cache_settings(args: Any, family: Any, model_name: str | None) -> dict[str, Any]:
    """What a cache depends on; a cache is reused (or resumed) only when all of it matches."""
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "model": model_name,
        "revision": args.revision,
        "variant": args.variant,
        "pipeline": family.pipeline_class.__name__,
        "resolution": args.resolution,
        "center_crop": args.center_crop,
        "random_flip": args.random_flip,
        "seed": args.seed,
        "max_sequence_length": args.max_sequence_length,
        "drop_t5_text_encoder": args.drop_t5_text_encoder,
        "num_frames": args.num_frames,
        "video_fps": args.video_fps,
        "cache_dtype": args.cache_dtype,
        "aspect_ratio_buckets": args.aspect_ratio_buckets,
    }


def build_latent_cache(
    model: Any,
    dataset: Any,
    output_dir: str | os.PathLike,
    args: Any = None,
    *,
    shard_size: int = 256,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    show_progress: bool = True,
) -> str:
    """Encode every pair of `dataset` once and write a latent cache to `output_dir`; returns the folder.

    `model` is a hub id or local pipeline folder (or a loaded `DiffusionFamily`), `dataset` a `datasets.Dataset` or
    a streaming `IterableDataset` in either preference schema, `args` a `PolyDPOConfig` (resolution, crop, flip,
    columns, seed, model loading options). Shards are written atomically and the manifest after each one, so an
    interrupted run resumes where it stopped when called again with the same arguments.
    """
    from ..models import DiffusionFamily, load_family
    from ..trainer import PolyDPOConfig

    args = args or PolyDPOConfig(output_dir=str(output_dir), report_to=[])
    os.makedirs(output_dir, exist_ok=True)
    if isinstance(model, DiffusionFamily):
        family, model_name = model, getattr(model, "name_or_path", None)
    else:
        frozen = getattr(torch, args.frozen_dtype_name)
        family = load_family(
            model, revision=args.revision, variant=args.variant, frozen_dtype=frozen, options=args.diffusion_options()
        )
        model_name = str(model)
    device = torch.device(device) if device is not None else (args.device if torch.cuda.is_available() else "cpu")
    family.to(device)

    settings = cache_settings(args, family, model_name)
    manifest_path = os.path.join(output_dir, MANIFEST_NAME)
    manifest: dict[str, Any] = {"settings": settings, "shards": [], "num_pairs": 0, "skipped": {}, "complete": False}
    if os.path.isfile(manifest_path):
        previous = read_manifest(output_dir)
        if previous.get("settings") != settings:
            changes = _diff(previous.get("settings", {}), settings)
            raise PreferenceDataError(
                f"{output_dir} holds a cache made with other settings ({changes}). Use another output_dir, or delete "
                "the folder to rebuild it."
            )
        if previous.get("complete"):
            return str(output_dir)
        manifest = previous

    pairs = pairs_from_config(dataset, args, family.bucket_divisibility)
    collate = PreferenceCollator(args.resolution, args.center_crop, args.random_flip)
    cache_dtype = getattr(torch, args.cache_dtype)
    skipped = Counter(manifest["skipped"])
    if isinstance(pairs, PreferencePairs):
        if manifest["num_pairs"] == 0:  # counted once, not again on a resume
            skipped.update(Counter(reason for _, reason in pairs.label_skips))
            if pairs.num_ties:
                skipped["tie"] += pairs.num_ties
        start = manifest["num_pairs"]
        items = (pairs[i] for i in range(start, len(pairs)))
        total = len(pairs)
    else:
        pairs.start_row = manifest.get("next_row", 0)
        items = iter(pairs)
        total = None

    buffers: dict[Any, list[dict[str, Any]]] = defaultdict(list)  # one per aspect-ratio bucket
    progress = tqdm(total=total, initial=manifest["num_pairs"], desc="Caching latents", disable=not show_progress)

    def flush(shard_items: list[dict[str, Any]]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        categories: list[Any] = []
        for start_ in range(0, len(shard_items), batch_size):
            batch = collate(shard_items[start_ : start_ + batch_size])
            for reason, n in Counter(reason for _, reason in batch["skipped"]).items():
                skipped[reason] += n
            encoded = encode_for_cache(family, batch, cache_dtype)
            for key, value in encoded.items():
                tensors.setdefault(key, []).append(value)
            categories += batch["categories"]
        stacked = {key: torch.cat(values).contiguous() for key, values in tensors.items()}
        name = f"shard-{len(manifest['shards']):05d}.safetensors"
        tmp = os.path.join(output_dir, name + ".tmp")
        bucket = shard_items[0].get("target_size")
        metadata = {"categories": json.dumps(categories), "bucket": json.dumps(bucket)}
        save_file(stacked, tmp, metadata=metadata)
        os.replace(tmp, os.path.join(output_dir, name))
        manifest["shards"].append({"file": name, "num_pairs": len(shard_items), "bucket": bucket})
        manifest["num_pairs"] += len(shard_items)
        manifest["skipped"] = dict(skipped)
        manifest["conditioning_keys"] = sorted(k[5:] for k in stacked if k.startswith("cond."))
        progress.update(len(shard_items))

    def flush_all() -> None:
        # Every buffered pair is written before the manifest moves on, so a resume never loses one.
        last_row = max(it["row_index"] for items_ in buffers.values() for it in items_)
        for key in sorted(buffers, key=str):
            flush(buffers[key])
        buffers.clear()
        manifest["next_row"] = last_row + 1
        _write_json_atomic(manifest_path, manifest)

    for item in items:
        buffers[item.get("target_size")].append(item)
        if sum(map(len, buffers.values())) == shard_size:
            flush_all()
    if buffers:
        flush_all()
    progress.close()
    skipped.update(reason for _, reason in getattr(pairs, "trailing_skipped", []))
    manifest["skipped"] = dict(skipped)
    if manifest["num_pairs"] == 0:
        raise PreferenceDataError("The dataset has zero usable preference pairs; no cache was written.")
    manifest["complete"] = True
    _write_json_atomic(manifest_path, manifest)
    return str(output_dir)


@torch.no_grad()
def encode_for_cache(family: Any, batch: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The per-pair tensors a cache shard stores for one collated batch."""
    # Chosen and rejected go through the VAE together, as in a training step on raw pairs.
    mean, std = family.encode_latent_distribution(
        torch.cat([batch["pixel_values_chosen"], batch["pixel_values_rejected"]])
    )
    (mean_c, mean_r), (std_c, std_r) = mean.chunk(2), std.chunk(2)
    out = dict(zip(LATENT_KEYS, (mean_c, std_c, mean_r, std_r)))
    out.update({f"cond.{k}": v for k, v in family.encode_conditioning(batch).items()})
    out = {k: v.detach().to("cpu", dtype) for k, v in out.items()}
    out["row_index"] = torch.tensor(batch["row_index"], dtype=torch.int64)
    return out


def _column_names(dataset: Any) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names:
        return list(names)
    return list(next(iter(dataset)).keys())  # a streaming dataset without declared features


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: cache {old.get(k)!r} vs now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


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
