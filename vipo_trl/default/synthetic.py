"""Synthetic preference sets from the base model's own samples, scored by the programmatic reward, in the generic
`prompt/chosen/rejected` schema: `clean`, `noisy` and `easy` (see `make_preference_set`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset
from PIL import Image

from ..data.images import encode_png
from ..models.generation import generate_images
from .shapes import ALL_SCENES, COLORS, SHAPES, Scene, attribute_scores

KINDS = ("clean", "noisy", "easy")
#: How every figure of the embedded default is sampled: DDIM, 20 steps, guidance 4, 48 images a batch (batched
#: kernels round differently at other batch sizes, so the same images need the same batch size too).
SAMPLING_STEPS, SAMPLING_GUIDANCE, SAMPLING_BATCH = 20, 4.0, 48


def use_ddim(pipe: Any) -> Any:
    """Give `pipe` the embedded model's sampler, DDIM (the shipped scheduler config is the training one, DDPM)."""
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def generate(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    guidance_scale: float = SAMPLING_GUIDANCE,
    steps: int = SAMPLING_STEPS,
    batch: int = SAMPLING_BATCH,
    progress: str | None = None,
) -> list[Image.Image]:
    """One image per (prompt, seed), with DDIM sampling (the embedded model's sampler)."""
    use_ddim(pipe)
    return generate_images(
        pipe,
        prompts,
        seeds,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        batch_size=batch,
        progress=progress,
    )


def _confused(prompt: str, rng: np.random.Generator) -> str:
    """The prompt a generator that confuses attributes draws: `prompt` with its colour or its shape swapped."""
    scene = Scene.from_prompt(prompt)
    if rng.random() < 0.5:
        scene = Scene(str(rng.choice([c for c in COLORS if c != scene.color])), scene.shape, scene.position)
    else:
        scene = Scene(scene.color, str(rng.choice([s for s in SHAPES if s != scene.shape])), scene.position)
    return scene.prompt


@dataclass
class PreferenceSetStats:
    """What was built: pair count, share of pairs whose label was flipped, share with conflicting attributes."""

    kind: str
    pairs: int
    flip_rate: float
    conflict_rate: float
    extra: dict[str, float] = field(default_factory=dict)


def make_preference_set(
    kind: str,
    pipe: Any,
    samples_per_prompt: int = 6,
    pairs_per_prompt: int = 6,
    flip_rate: float = 0.2,
    seed: int = 0,
    scenes: list | None = None,
    progress: str | None = None,
) -> tuple[Dataset, PreferenceSetStats]:
    """A preference set in the generic schema from `samples_per_prompt` base-model samples per scene prompt.

    * `clean`: the winner has the higher reward (more attributes right); labels are correct.
    * `noisy`: samples from two generators and annotators who weigh aspects differently. Half of each prompt's
      samples come from the model, half from a weaker generator that confuses attributes (the same model given the
      prompt with its colour or its shape swapped): the model errs mostly on position, the weaker one on colour or
      shape, so their pairs conflict (one better on an attribute, worse on another) as pairs from the different
      generators of Pick-a-Pic v2 do. Each pair of differing samples is labelled by one attribute drawn at random
      (the winner is the sample right on it; a coin decides when that attribute does not tell them apart),
      conflicting pairs taken first; then `flip_rate` of the labels are flipped, as in Pick-a-Pic v2.
      `extra["agrees_with_reward"]` is the share of labels that pick the sample with more attributes right, among
      pairs where the two differ in that count.
    * `easy` (over-simple, as the paper built it): the winner is a good sample for the prompt; the loser an image made
      for a different prompt, so the pair is trivially told apart.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {KINDS}.")
    rng = np.random.default_rng(seed)
    scenes = scenes or ALL_SCENES
    prompts = [s.prompt for s in scenes for _ in range(samples_per_prompt)]
    seeds = [int(x) for x in rng.integers(0, 2**31, size=len(prompts))]
    asked = list(prompts)
    if kind == "noisy":  # every other sample from the weaker generator
        asked = [_confused(p, rng) if k % 2 else p for k, p in enumerate(prompts)]
    images = generate(pipe, asked, seeds, progress=progress)
    by_prompt: dict[str, list[tuple[Image.Image, np.ndarray]]] = {}
    for prompt, image in zip(prompts, images):
        by_prompt.setdefault(prompt, []).append((image, np.array(attribute_scores(image, prompt))))

    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    flipped = conflicting = decided = agree = 0
    names = list(by_prompt)
    for prompt_index, (prompt, samples) in enumerate(by_prompt.items()):
        candidates, conflicts = [], []
        for i in range(len(samples)):
            for j in range(i + 1, len(samples)):
                a, b = samples[i][1], samples[j][1]
                diff = a - b
                if kind == "clean" and a.sum() != b.sum():
                    candidates.append((i, j) if a.sum() > b.sum() else (j, i))
                elif kind == "noisy" and diff.any():
                    attribute = rng.integers(len(diff))  # the aspect this "annotator" looked at
                    first_wins = diff[attribute] > 0 if diff[attribute] != 0 else rng.random() < 0.5
                    pair = (i, j) if first_wins else (j, i)
                    conflict = bool((diff > 0).any() and (diff < 0).any())
                    (conflicts if conflict else candidates).append(pair)
        if kind == "easy":
            best = max(range(len(samples)), key=lambda k: samples[k][1].sum())
            other = names[(prompt_index + 1 + rng.integers(len(names) - 1)) % len(names)]
            for k in range(min(pairs_per_prompt, len(by_prompt[other]))):
                rows["prompt"].append(prompt)
                rows["chosen"].append(encode_png(samples[best][0]))
                rows["rejected"].append(encode_png(by_prompt[other][k][0]))
            continue
        rng.shuffle(conflicts)
        rng.shuffle(candidates)
        for winner, loser in (conflicts + candidates)[:pairs_per_prompt]:
            if kind == "noisy":
                won, lost = samples[winner][1], samples[loser][1]
                conflicting += bool((won > lost).any() and (won < lost).any())
                if rng.random() < flip_rate:
                    winner, loser = loser, winner
                    flipped += 1
                totals = samples[winner][1].sum(), samples[loser][1].sum()
                if totals[0] != totals[1]:
                    decided += 1
                    agree += totals[0] > totals[1]
            rows["prompt"].append(prompt)
            rows["chosen"].append(encode_png(samples[winner][0]))
            rows["rejected"].append(encode_png(samples[loser][0]))
    n = len(rows["prompt"])
    if n == 0:
        raise ValueError(
            f"no {kind} pairs: the model's {len(images)} samples hold no pair that fits the definition (every "
            "sample of a prompt has the same attributes right). Draw more samples_per_prompt."
        )
    stats = PreferenceSetStats(kind, n, flipped / max(n, 1), conflicting / max(n, 1))
    if kind == "noisy":
        stats.extra["agrees_with_reward"] = agree / max(decided, 1)
    return Dataset.from_dict(rows), stats
