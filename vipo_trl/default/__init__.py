"""The embedded default: a tiny text-to-image model that ships with vipo-trl, a programmatic reward and synthetic
preference sets, so `vipo-trl train` with no model and no data shows the whole loop on a CPU in minutes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .shapes import ALL_SCENES, Scene, read_scene, render, reward
from .synthetic import KINDS, PreferenceSetStats, generate, make_preference_set

MODEL_DIR = Path(__file__).parent / "model"
#: Held-out evaluation: every scene prompt, with seeds no training pair used.
EVAL_SEEDS = (10_001, 10_002)

__all__ = [
    "ALL_SCENES",
    "KINDS",
    "MODEL_DIR",
    "PreferenceSetStats",
    "Scene",
    "evaluate_reward",
    "generate",
    "load_default_pipeline",
    "make_preference_set",
    "read_scene",
    "render",
    "reward",
    "run_default",
]


def load_default_pipeline(lora: str | None = None, model_dir: str | Path = MODEL_DIR) -> Any:
    """The shipped model (or a rebuilt one in `model_dir`) as a `StableDiffusionPipeline`, optionally with a LoRA."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    if lora:
        pipe.load_lora_weights(lora)
    return pipe


def evaluate_reward(pipe: Any, seeds: tuple[int, ...] = EVAL_SEEDS) -> tuple[float, list]:
    """Mean reward over every scene prompt x `seeds`, and the images."""
    prompts = [s.prompt for s in ALL_SCENES for _ in seeds]
    images = generate(pipe, prompts, [seed for _ in ALL_SCENES for seed in seeds])
    return float(np.mean([reward(im, p) for im, p in zip(images, prompts)])), images


def save_grid(rows: list[list], path: Path, scale: int = 3) -> None:
    from PIL import Image

    width = max(len(r) for r in rows)
    size = rows[0][0].width * scale
    grid = Image.new("RGB", (width * size, len(rows) * size), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image.resize((size, size), Image.NEAREST), (x * size, y * size))
    grid.save(path)


def run_default(config: Any = None, model_dir: str | Path = MODEL_DIR) -> dict[str, float]:
    """Align the shipped model with Poly-DPO on its `clean` synthetic set and report base vs aligned reward.

    `config` is a `PolyDPOConfig` (from the command line); fields left at their defaults get the embedded run's
    values: LoRA r=8, 300 steps, batch 8, learning rate 3e-3, beta 2000, alpha 0, CPU.
    """
    from peft import LoraConfig

    from ..trainer import PolyDPOConfig, PolyDPOTrainer

    start = time.perf_counter()
    defaults = PolyDPOConfig(output_dir="unused", report_to=[])
    given = config.to_dict() if config is not None else {}
    overrides = dict(
        output_dir="vipo-default-run",
        max_steps=300,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        resolution=32,
        random_flip=False,
        beta=2000.0,
        logging_steps=20,
        save_strategy="no",
        report_to=[],
        seed=0,
    )
    unchanged = {k: v for k, v in overrides.items() if given.get(k, getattr(defaults, k)) == getattr(defaults, k)}
    if config is None or given.get("output_dir") in (None, "trainer_output"):
        unchanged["output_dir"] = overrides["output_dir"]
    args = config if config is not None else defaults
    for key, value in unchanged.items():
        setattr(args, key, value)
    args.use_cpu = args.use_cpu or not _cuda()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    print("vipo-trl embedded default: a tiny shapes model, its clean synthetic preference set, Poly-DPO + LoRA.")
    base = load_default_pipeline(model_dir=model_dir)
    base_reward, base_images = evaluate_reward(base)
    print(f"base model reward on {len(base_images)} held-out prompt/seed pairs: {base_reward:.3f}")
    dataset, stats = make_preference_set("clean", base, seed=args.seed)
    print(f"built the clean preference set: {stats.pairs} pairs from the base model's samples")

    lora = LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian")
    trainer = PolyDPOTrainer(str(model_dir), args, dataset, peft_config=lora)
    trainer.dataset_name = "vipo-trl synthetic shapes (clean)"
    trainer.train()
    trainer.save_model()

    aligned = load_default_pipeline(lora=str(out), model_dir=model_dir)
    aligned_reward, aligned_images = evaluate_reward(aligned)
    step = len(EVAL_SEEDS) * 4  # one scene in four, to keep the grid readable
    save_grid([base_images[::step], aligned_images[::step]], out / "samples.png")
    minutes = (time.perf_counter() - start) / 60
    print(f"aligned model reward: {aligned_reward:.3f} (base {base_reward:.3f}, {aligned_reward - base_reward:+.3f})")
    print(f"before/after grid (top: base, bottom: aligned): {out / 'samples.png'}; LoRA in {out}; {minutes:.1f} min")
    return {"base_reward": base_reward, "aligned_reward": aligned_reward, "pairs": stats.pairs, "minutes": minutes}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
