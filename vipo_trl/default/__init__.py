"""The embedded default: a tiny text-to-image model that ships with vipo-trl, a programmatic reward and synthetic
preference sets, so `vipo-trl train` with no model and no data shows the whole loop on a CPU in minutes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..models.generation import labelled_grid
from .shapes import ALL_SCENES, Scene, read_scene, render, reward
from .synthetic import KINDS, PreferenceSetStats, generate, make_preference_set

MODEL_DIR = Path(__file__).parent / "model"
#: Held-out evaluation: every scene prompt, with seeds no training pair used.
EVAL_SEEDS = (10_001, 10_002)

#: The embedded run's settings; on the command line a flag the user gives wins over each of them.
DEFAULT_OUTPUT_DIR = "vipo-default-run"
DEFAULT_SETTINGS: dict[str, Any] = {
    "output_dir": DEFAULT_OUTPUT_DIR,
    "max_steps": 300,
    "per_device_train_batch_size": 8,
    "learning_rate": 3e-3,
    "resolution": 32,
    "random_flip": False,
    "beta": 2000.0,
    "logging_steps": 20,
    "save_strategy": "no",
    "report_to": [],
    "seed": 0,
}
#: The embedded run's LoRA (`peft.LoraConfig` fields); on the command line the LoRA flags (`--lora_r`, `--use_dora`,
#: ...) win over each of them.
DEFAULT_LORA: dict[str, Any] = {"r": 8, "lora_alpha": 8, "init_lora_weights": "gaussian"}

__all__ = [
    "ALL_SCENES",
    "DEFAULT_LORA",
    "DEFAULT_SETTINGS",
    "apply_default_settings",
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
    """The shipped model (or a rebuilt one in `model_dir`) as a `StableDiffusionPipeline`, optionally with a training
    run's output (`lora`: a LoRA, or a full fine-tune's UNet folder)."""
    from diffusers import StableDiffusionPipeline

    from ..models.generation import load_aligned_weights

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    return load_aligned_weights(pipe, lora) if lora else pipe


def evaluate_reward(
    pipe: Any, seeds: tuple[int, ...] = EVAL_SEEDS, progress: str | None = None, scenes: Sequence[Scene] = ALL_SCENES
) -> tuple[float, list]:
    """Mean reward over every scene prompt (of `scenes`) x `seeds`, and the images (a progress bar titled
    `progress`)."""
    prompts = [s.prompt for s in scenes for _ in seeds]
    images = generate(pipe, prompts, [seed for _ in scenes for seed in seeds], progress=progress)
    return float(np.mean([reward(im, p) for im, p in zip(images, prompts)])), images


def grid_tiles() -> list[int]:
    """Indices (into `evaluate_reward`'s images) of 12 scenes that show every colour, shape and position."""
    positions = 4
    scenes = [i * positions + i % positions for i in range(len(ALL_SCENES) // positions)]
    return [scene * len(EVAL_SEEDS) for scene in scenes]


def apply_default_settings(config: Any, given: set[str] | frozenset[str] = frozenset()) -> Any:
    """Give `config` the embedded run's settings, except those in `given` (the fields the user set): a flag equal to
    its transformers default still wins. `--save_steps` alone turns checkpoints on."""
    for key, value in DEFAULT_SETTINGS.items():
        if key in given or (key == "save_strategy" and "save_steps" in given):
            continue
        setattr(config, key, value)
    if not config.use_cpu:
        config.use_cpu = not _cuda()
    return config


def run_default(config: Any = None, model_dir: str | Path = MODEL_DIR, peft_config: Any = None) -> dict[str, float]:
    """Align the shipped model with Poly-DPO on its `clean` synthetic set and report base vs aligned reward.

    `config` is a `PolyDPOConfig` used as it is (the command line fills what the user did not set from
    `DEFAULT_SETTINGS`); `None` means `DEFAULT_SETTINGS`: LoRA r=8, 300 steps of 8 pairs, learning rate 3e-3, beta
    2000, alpha 0, on the CPU. `config.resume_from_checkpoint` is honoured. `peft_config`: the LoRA to train, by
    default `LoraConfig(**DEFAULT_LORA)`.
    """
    from peft import LoraConfig

    from ..trainer import PolyDPOConfig, PolyDPOTrainer

    start = time.perf_counter()
    args = config if config is not None else apply_default_settings(PolyDPOConfig(**DEFAULT_SETTINGS))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    print("vipo-trl embedded default: a tiny shapes model, its clean synthetic preference set, Poly-DPO + LoRA.")
    base = load_default_pipeline(model_dir=model_dir)
    base_reward, base_images = evaluate_reward(base, progress="base model: sampling")
    print(
        f"base model reward on {len(base_images)} held-out samples (every scene prompt x seeds "
        f"{', '.join(map(str, EVAL_SEEDS))}): {base_reward:.3f}"
    )
    dataset, stats = make_preference_set("clean", base, seed=args.seed, progress="preference set: sampling")
    print(f"built the clean preference set: {stats.pairs} pairs from the base model's samples (seed {args.seed})")

    lora = peft_config if peft_config is not None else LoraConfig(**DEFAULT_LORA)
    trainer = PolyDPOTrainer(str(model_dir), args, dataset, peft_config=lora)
    trainer.dataset_name = "vipo-trl synthetic shapes (clean)"
    resume = args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if str(resume).lower() in ("latest", "true") else resume)
    trainer.save_model()

    aligned = load_default_pipeline(lora=str(out), model_dir=model_dir)
    aligned_reward, aligned_images = evaluate_reward(aligned, progress="aligned model: sampling")
    tiles = grid_tiles()
    labelled_grid(
        {"base": [base_images[i] for i in tiles], "aligned": [aligned_images[i] for i in tiles]},
        [ALL_SCENES[i // len(EVAL_SEEDS)].prompt.removeprefix("a ") for i in tiles],
    ).save(out / "samples.png")
    minutes = (time.perf_counter() - start) / 60
    print(
        f"aligned model reward: {aligned_reward:.3f} (base {base_reward:.3f}, {aligned_reward - base_reward:+.3f}; "
        f"the same {len(aligned_images)} held-out samples)"
    )
    print(f"before/after grid (rows: base, aligned; seed {EVAL_SEEDS[0]}): {out / 'samples.png'}")
    print(f"vipo-trl: LoRA saved to {out} after {trainer.state.global_step} steps ({minutes:.1f} min)")
    return {"base_reward": base_reward, "aligned_reward": aligned_reward, "pairs": stats.pairs, "minutes": minutes}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
