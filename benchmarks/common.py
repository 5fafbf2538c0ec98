"""Pieces the benchmark scripts share: a small Stable Diffusion pipeline of realistic depth, preference pairs in
Pick-a-Pic v2's schema, and a min/median/max summary of ratios."""

from __future__ import annotations

import os
import statistics
import threading
import time

from datasets import Dataset


class MemoryProbe:
    """Peak memory from now on: CUDA max allocated on a GPU; on a CPU the peak growth of the resident set size over
    its value now, sampled every millisecond by a thread (the process-lifetime `ru_maxrss` would include imports).
    Call `start_of_training` once the model is loaded to leave loading transients out of the peak."""

    def __init__(self, device: str):
        import torch

        self.cuda = device == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def start_of_training(self) -> None:
        """Forget peaks from before this point (loading transients: a checkpoint read next to the module it fills),
        keeping the baseline: the peak then counts the weights resident and what training adds to them."""
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self._rss()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self) -> None:
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def peak_mb(self) -> float:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        self.running = False
        self.thread.join()
        return (max(self.peak, self._rss()) - self.base) / 2**20


def small_sd(path: str, unet_width: int = 32, unet_levels: int = 2, seed: int = 0) -> None:
    """SD-like proportions at a small width: 4-level VAE (8x downsampling, as SD's), a UNet of `unet_levels` levels
    (the last ones with cross-attention) with base width `unet_width`, and a 4-layer CLIP text encoder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    widths = tuple(unet_width * min(2**i, 4) for i in range(unet_levels))
    unet, vae = (
        UNet2DConditionModel(
            block_out_channels=widths,
            layers_per_block=2,
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (unet_levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (unet_levels - 1) + ("UpBlock2D",),
            cross_attention_dim=64,
            attention_head_dim=8,
            norm_num_groups=8,
        ),
        AutoencoderKL(
            block_out_channels=(32, 64, 64, 64),
            layers_per_block=2,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=8,
        ),
    )
    _save_sd(path, unet, vae, hidden=64, intermediate=256, heads=4, layers=4)


def sd15_sized(path: str, seed: int = 0) -> None:
    """A pipeline of Stable Diffusion 1.5's real sizes, random weights (nothing downloaded): its UNet (320/640/1280/1280
    channels, cross-attention 768: 859.5M parameters), its VAE (128/256/512/512) and a CLIP ViT-L/14-sized text
    encoder (12 layers of 768). Only the tokenizer is small (a short vocabulary; the encoder's size is unchanged but
    for its embedding table)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet, vae = (
        UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            sample_size=64,
        ),
        _sd_vae(sample_size=512),
    )
    _save_sd(path, unet, vae, hidden=768, intermediate=3072, heads=12, layers=12)


def sdxl_sized(path: str, seed: int = 0) -> None:
    """A pipeline of SDXL's real sizes, random weights (nothing downloaded): its UNet (gpu_check.py's SDXL config:
    320/640/1280 channels, 1/2/10 transformer layers, cross-attention 2048, text-time conditioning: 2567.5M
    parameters), SD's VAE (SDXL's scaling factor), a CLIP ViT-L/14-sized and an OpenCLIP bigG-sized text encoder (32
    layers of 1280, projection 1280). Only the tokenizers are small (short vocabularies)."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from gpu_check import build
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from vipo_trl.testing import tiny_clip_tokenizer

    torch.manual_seed(seed)
    unet, _, _ = build("sdxl", tiny=False)
    vae = _sd_vae(sample_size=1024, scaling_factor=0.13025)
    tokenizer = tiny_clip_tokenizer(max_length=77)
    StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel(_clip_text_config(len(tokenizer), 768, 3072, 12, 12)),
        text_encoder_2=CLIPTextModelWithProjection(
            _clip_text_config(len(tokenizer), 1280, 5120, 20, 32, projection_dim=1280)
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
    ).save_pretrained(path)


def _sd_vae(**kwargs):
    """Stable Diffusion's VAE (128/256/512/512 channels, 4 latent channels), random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        **kwargs,
    )


def _clip_text_config(vocab: int, hidden: int, intermediate: int, heads: int, layers: int, **extra):
    """A CLIP text encoder's config of the given size, for a tokenizer of `vocab` tokens (77 positions)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=77,
        vocab_size=vocab,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )


def _save_sd(path: str, unet, vae, hidden: int, intermediate: int, heads: int, layers: int) -> None:
    """A StableDiffusionPipeline of `unet`, `vae`, a CLIP text encoder of the given size (a small tokenizer) and SD's
    scheduler, saved to `path`."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    from vipo_trl.testing import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer(max_length=77)
    text = _clip_text_config(len(tokenizer), hidden, intermediate, heads, layers)
    StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel(text),
        tokenizer=tokenizer,
        scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(path)


def pickapic_pairs(n: int, image_size: int) -> Dataset:
    """`n` pairs in Pick-a-Pic v2's schema with PNG images of `image_size` pixels (larger than the training crop, as
    real data is)."""
    from vipo_trl.testing import pickapic_dataset, png_bytes

    return pickapic_dataset(n).map(
        lambda row, i: {
            "jpg_0": png_bytes((200, 30 + i % 50, 30), (image_size, image_size)),
            "jpg_1": png_bytes((30, 30 + i % 50, 200), (image_size, image_size)),
        },
        with_indices=True,
    )


def spread(values: list[float]) -> str:
    return f"min {min(values):.2f}, median {statistics.median(values):.2f}, max {max(values):.2f}"
