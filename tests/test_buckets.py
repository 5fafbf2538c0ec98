"""Aspect-ratio buckets: undistorted resize-and-crop, one bucket per batch, raw and cached training."""

from collections import Counter

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from PIL import Image

from vipo_trl import PolyDPOConfig, PolyDPOTrainer, build_latent_cache
from vipo_trl.data import LatentCacheDataset, paired_transform, read_manifest
from vipo_trl.data.sampling import BucketSampler, nearest_bucket, resolve_buckets
from vipo_trl.testing import png_bytes

BUCKETS = "64,64;64,128;128,64"


def mixed_dataset(n: int = 8) -> Dataset:
    """Half square (16x16) and half wide (40x16) pairs, interleaved."""
    sizes = [(16, 16) if i % 2 == 0 else (40, 16) for i in range(n)]
    return Dataset.from_dict(
        {
            "prompt": [f"a red thing {i}" for i in range(n)],
            "chosen": [png_bytes((200, 20, 20), size) for size in sizes],
            "rejected": [png_bytes((20, 20, 200), size) for size in sizes],
        }
    )


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        resolution=64,
        aspect_ratio_buckets=BUCKETS,
        per_device_train_batch_size=2,
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    base.update(kw)
    return PolyDPOConfig(**base)


def lora():
    return LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def test_bucket_resolution_and_nearest():
    assert resolve_buckets(BUCKETS, 64, 64) == [(64, 64), (64, 128), (128, 64)]
    auto = resolve_buckets("auto", 1024, 64)
    assert (1024, 1024) in auto and all(h % 64 == 0 and w % 64 == 0 for h, w in auto)
    assert nearest_bucket(16, 40, [(64, 64), (64, 128)]) == (64, 128)
    with pytest.raises(ValueError, match="not multiples of 64"):
        resolve_buckets("60,64", 64, 64)


def test_bucketed_transform_keeps_the_aspect_ratio():
    # A horizontal gradient 80 wide, 40 high into a (32, 64) bucket: a pure 2x downscale, nothing cropped.
    gradient = np.tile(np.linspace(0, 255, 80, dtype=np.float32)[None, :, None], (40, 1, 3)).astype(np.uint8)
    image = Image.fromarray(gradient)
    chosen, rejected, original, crop = paired_transform(image, image, (32, 64), center_crop=True, random_flip=False)
    assert chosen.shape == (3, 32, 64) and original == (40, 80) and crop == (0, 0)
    row = chosen[0, 0]
    assert row[0] < -0.95 and row[-1] > 0.95  # both ends of the gradient survive: no crop, no stretch


def test_bucket_sampler_gives_one_bucket_per_batch_and_replays():
    buckets = ["a"] * 5 + ["b"] * 3 + ["c"]
    sampler = BucketSampler(buckets, batch_size=2, seed=1)
    order = list(sampler)
    assert len(order) == len(sampler) == 6 + 4 + 2
    for i in range(0, len(order), 2):
        assert len({buckets[j] for j in order[i : i + 2]}) == 1
    assert set(order) == set(range(9))
    sampler.set_epoch(0)
    assert list(sampler) == order


def test_training_with_buckets_raw_and_from_the_cache(tmp_path, tiny_sd_path):
    data = mixed_dataset()
    trainer = PolyDPOTrainer(tiny_sd_path, config(tmp_path), data, peft_config=lora())
    shapes = Counter(tuple(b["pixel_values_chosen"].shape[-2:]) for b in trainer.get_train_dataloader())
    assert shapes == Counter({(64, 64): 2, (64, 128): 2})
    trainer.train()
    assert all(np.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)

    cache = build_latent_cache(tiny_sd_path, data, tmp_path / "cache", config(tmp_path), shard_size=4)
    manifest = read_manifest(cache)
    per_bucket = Counter()
    for shard in manifest["shards"]:
        per_bucket[tuple(shard["bucket"])] += shard["num_pairs"]
    assert per_bucket == Counter({(64, 64): 4, (64, 128): 4})  # one shard per bucket at each flush
    cached = PolyDPOTrainer(tiny_sd_path, config(tmp_path), cache, peft_config=lora())
    assert isinstance(cached.train_dataset, LatentCacheDataset)
    widths = Counter(int(b["latent_mean_chosen"].shape[-1]) for b in cached.get_train_dataloader())
    assert widths == Counter({32: 2, 64: 2})  # latents of 64- and 128-pixel-wide images (VAE factor 2)
    cached.train()
    assert torch.isfinite(torch.tensor(cached.state.log_history[-1]["train_loss"]))


def test_buckets_with_a_raw_stream_are_refused(tmp_path, tiny_sd_path):
    with pytest.raises(ValueError, match="build a latent cache"):
        PolyDPOTrainer(tiny_sd_path, config(tmp_path), mixed_dataset().to_iterable_dataset(), peft_config=lora())
