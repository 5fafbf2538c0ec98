"""Building a latent cache: encode every pair once with the model's VAE and text encoders and write the shards and
manifest that `vipo_trl.data.LatentCacheDataset` reads. It loads models, so it lives above the data layer."""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..data import PreferenceCollator, PreferenceDataError, PreferencePairs, pairs_from_options
from ..data.cache import (
    CACHE_FORMAT_VERSION,
    EMPTY_PROMPT_NAME,
    LATENT_KEYS,
    MANIFEST_NAME,
    read_manifest,
    write_json_atomic,
)
from ..models import DiffusionFamily, load_family
from .poly_dpo_config import PolyDPOConfig


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
    family.warn_if_far_from_native(args.resolution)
    device = torch.device(device) if device is not None else (args.device if torch.cuda.is_available() else "cpu")
    family.to(device)

    settings = cache_settings(args, family, model_name)
    manifest_path = os.path.join(output_dir, MANIFEST_NAME)
    manifest: dict[str, Any] = {"settings": settings, "shards": [], "num_pairs": 0, "skipped": {}, "complete": False}
    previous = read_manifest(output_dir) if os.path.isfile(manifest_path) else None
    if previous is not None and previous.get("settings") != settings:
        changes = _diff(previous.get("settings", {}), settings)
        raise PreferenceDataError(
            f"{output_dir} holds a cache made with other settings ({changes}). Use another output_dir, or delete "
            "the folder to rebuild it."
        )
    # Written first, so a cache built by an older version gains it by running the same build again.
    _write_empty_prompt(family, output_dir, getattr(torch, args.cache_dtype))
    if previous is not None:
        if previous.get("complete"):
            return str(output_dir)
        manifest = previous

    pairs = pairs_from_options(dataset, args.data_options(), family.bucket_divisibility)
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
        write_json_atomic(manifest_path, manifest)

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
    write_json_atomic(manifest_path, manifest)
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


def _write_empty_prompt(family: Any, output_dir: str | os.PathLike, dtype: torch.dtype) -> None:
    """What `proportion_empty_prompts` trains on, for a run from this cache that loads no text encoder."""
    path = os.path.join(output_dir, EMPTY_PROMPT_NAME)
    if os.path.isfile(path):
        return
    empty = {k: v.detach().to("cpu", dtype).contiguous() for k, v in family.empty_prompt_conditioning().items()}
    save_file(empty, path + ".tmp")
    os.replace(path + ".tmp", path)


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: cache {old.get(k)!r} vs now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))
