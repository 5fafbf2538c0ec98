"""Build the tiny text-to-image model that ships with vipo-trl (`vipo_trl/default/model`), from scratch, on a CPU.

    python -m vipo_trl.default.build_model [--steps 4500] [--output vipo_trl/default/model]

It is a real `StableDiffusionPipeline` (AutoencoderKL, CLIP text encoder and tokenizer, UNet2DConditionModel, DDPM
scheduler) at toy size, pre-trained on rendered scenes of `vipo_trl.default.shapes` ("a red circle on the left").
The budget is kept short on purpose: the result draws colour and shape right but often misplaces the shape,
something for preference optimization to fix. Seeded, so a rerun on the same machine gives the same weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .shapes import ALL_SCENES, COLORS, POSITIONS, SHAPES, Scene, render

DEFAULT_OUTPUT = Path(__file__).parent / "model"
WORDS = ["a", "on", "the", *COLORS, *SHAPES, *POSITIONS]


def word_tokenizer():
    """A CLIP tokenizer whose BPE merges spell exactly the scene words: one token per word."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)


def components() -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = word_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        layers_per_block=1,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
    )
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet, "scheduler": scheduler}


def to_pixels(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im, np.float32) / 127.5 - 1 for im in images])).permute(0, 3, 1, 2)


def scene_batch(rng: np.random.Generator, n: int):
    scenes = [ALL_SCENES[i] for i in rng.integers(len(ALL_SCENES), size=n)]
    return scenes, to_pixels([render(s, rng) for s in scenes])


def train_vae(vae, rng, steps: int, log) -> float:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    for step in range(steps):
        _, pixels = scene_batch(rng, 32)
        dist = vae.encode(pixels).latent_dist
        recon = vae.decode(dist.sample()).sample
        kl = dist.kl().mean() / pixels[0].numel()
        loss = F.mse_loss(recon, pixels) + 1e-4 * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 200 == 0:
            log(f"vae step {step}: loss {loss.item():.4f}")
    with torch.no_grad():
        _, pixels = scene_batch(rng, 256)
        return float(vae.encode(pixels).latent_dist.mean.std())


def train_denoiser(
    parts, rng, steps: int, log, bank_size: int = 8192, batch_size: int = 32, color_noise: float = 0.0
) -> None:
    unet, text_encoder, tokenizer, vae, scheduler = (
        parts[k] for k in ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
    )
    # A bank of rendered scenes, encoded once: the VAE is frozen by now. With `color_noise`, that share of the
    # images shows the wrong colour for its caption (an experiment; the shipped model uses 0).
    scenes, means, stds = [], [], []
    with torch.no_grad():
        for _ in range(bank_size // 256):
            batch_scenes, pixels = scene_batch(rng, 256)
            if color_noise:
                shown = [
                    Scene(rng.choice([c for c in COLORS if c != s.color]), s.shape, s.position)
                    if rng.random() < color_noise
                    else s
                    for s in batch_scenes
                ]
                pixels = to_pixels([render(s, rng) for s in shown])
            dist = vae.encode(pixels).latent_dist
            scenes += batch_scenes
            means.append(dist.mean)
            stds.append(dist.std)
    means, stds = torch.cat(means), torch.cat(stds)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    warmup = min(100, steps // 10 + 1)
    lr = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))
    )
    scale = vae.config.scaling_factor
    for step in range(steps):
        index = torch.from_numpy(rng.integers(len(scenes), size=batch_size))
        latents = (means[index] + stds[index] * torch.randn_like(means[index])) * scale
        # 10% empty prompts, so classifier-free guidance works at sampling time.
        prompts = [scenes[i].prompt if rng.random() > 0.1 else "" for i in index.tolist()]
        ids = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
        hidden = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr.step()
        if step % 250 == 0:
            log(f"denoiser step {step}: loss {loss.item():.4f}")


def build(
    output: Path,
    vae_steps: int,
    steps: int,
    seed: int = 0,
    log=print,
    vae_from: str | None = None,
    color_noise: float = 0.0,
) -> Path:
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    parts = components()
    initial_torch_state = torch.get_rng_state()
    start = time.perf_counter()
    if vae_from:  # reuse an already trained VAE (and its scaling factor)
        parts["vae"] = AutoencoderKL.from_pretrained(vae_from, subfolder="vae")
    else:
        latent_std = train_vae(parts["vae"], rng, vae_steps, log)
        parts["vae"].register_to_config(scaling_factor=round(1.0 / latent_std, 4))
    parts["vae"].requires_grad_(False)
    # The denoiser stage starts from the same random state whether the VAE was trained here or reused.
    torch.set_rng_state(initial_torch_state)
    rng = np.random.default_rng(seed)
    train_denoiser(parts, rng, steps, log, color_noise=color_noise)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(output)
    log(f"saved to {output} in {time.perf_counter() - start:.0f} s")
    return output


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    parser.add_argument("--vae_steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=4500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae_from", default=None, help="a pipeline folder whose trained VAE to reuse")
    parser.add_argument("--color_noise", type=float, default=0.0, help="share of renders shown in a wrong colour")
    args = parser.parse_args()
    build(
        Path(args.output), args.vae_steps, args.steps, args.seed, vae_from=args.vae_from, color_noise=args.color_noise
    )
