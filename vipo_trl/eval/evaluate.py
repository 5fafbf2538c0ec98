"""Generate with a base pipeline and with base + LoRA on the same prompts and seeds, score both, and report mean
scores and the win rate of aligned over base (`evaluate_alignment`, `vipo-trl eval`); `RewardEvalCallback` does the
same during training."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import TrainerCallback

from ..data.prompts import load_prompt_set
from ..models.generation import (
    check_aligned_weights,
    generate_images,
    labelled_grid,
    load_aligned_weights,
    swap_in_aligned_weights,
)
from ..utils import pyplot_or_none
from .scorers import RewardScorer, get_scorer
from .stats import WinRate, win_rate
from .video_scorers import for_videos, is_video

#: A small built-in prompt set for real text-to-image models (objects, counts, colours, positions, styles, text).
BUILTIN_PROMPTS = [
    "a photo of a red apple on a wooden table",
    "two cats sleeping on a blue sofa",
    "a lighthouse on a cliff at sunset, oil painting",
    "a bowl of ramen, studio photograph",
    "an astronaut riding a horse on the moon",
    "a green bicycle to the left of a yellow door",
    "a watercolor painting of a fox in the snow",
    "a sign that says 'OPEN' in neon letters",
    "a portrait of an old fisherman, dramatic lighting",
    "three blue balloons above a white house",
    "a futuristic city skyline at night, cyberpunk",
    "a close-up of a dew drop on a leaf",
    "a dog wearing sunglasses at the beach",
    "a cozy library with a fireplace",
    "a mountain lake reflecting pine trees at dawn",
    "a cup of coffee next to an open book",
]


@dataclass
class EvalResult:
    """Mean scores of base and aligned per scorer, the aligned-over-base win rate per scorer, and per-image scores.
    `labels` name the two models in reports: ("base", "aligned"), or the two runs compared with `baseline`."""

    prompts: list[str]
    seeds: list[int]
    base_scores: dict[str, list[float]]
    aligned_scores: dict[str, list[float]] = field(default_factory=dict)
    win_rates: dict[str, WinRate] = field(default_factory=dict)
    labels: tuple[str, str] = ("base", "aligned")

    def mean(self, scorer: str, which: str = "aligned") -> float:
        scores = (self.aligned_scores if which == "aligned" else self.base_scores)[scorer]
        return float(sum(scores) / len(scores))

    def to_dict(self) -> dict[str, Any]:
        summary = {
            name: {
                "base_mean": self.mean(name, "base"),
                **({"aligned_mean": self.mean(name)} if name in self.aligned_scores else {}),
                **({"win_rate": self.win_rates[name].to_dict()} if name in self.win_rates else {}),
            }
            for name in self.base_scores
        }
        return {
            "labels": list(self.labels),
            "summary": summary,
            "prompts": self.prompts,
            "seeds": self.seeds,
            "base_scores": self.base_scores,
            "aligned_scores": self.aligned_scores,
        }

    def table(self) -> str:
        first, second = self.labels
        lines = [f"| scorer | {first} | {second} | win rate ({second} over {first}, 95% CI) |", "|---|---|---|---|"]
        for name in self.base_scores:
            aligned = f"{self.mean(name):.4f}" if name in self.aligned_scores else "-"
            rate = str(self.win_rates[name]) if name in self.win_rates else "-"
            lines.append(f"| {name} | {self.mean(name, 'base'):.4f} | {aligned} | {rate} |")
        return "\n".join(lines)


#: Side of a tile in `grid.png`.
GRID_CELL = 256


def score_all(
    scorers: Sequence[RewardScorer], images: Sequence[Image.Image], prompts: Sequence[str]
) -> dict[str, list[float]]:
    return {scorer.name: scorer.score(images, prompts).tolist() for scorer in scorers}


def resolve_scorers(scorers: Sequence[str | RewardScorer], **kwargs: Any) -> list[RewardScorer]:
    return [s if isinstance(s, RewardScorer) else get_scorer(s, **kwargs) for s in scorers]


def load_prompts(source: str | os.PathLike | None, column: str | None = None, limit: int | None = None) -> list[str]:
    """Prompts from a text file (one per line), a JSON list, a dataset file or folder (its `column`; by default
    `caption` or `prompt`, whichever it has), or the built-in set (`BUILTIN_PROMPTS`); read by
    `vipo_trl.data.prompts.load_prompt_set`, without categories."""
    if source is None:
        prompts = list(BUILTIN_PROMPTS)
        return prompts[:limit] if limit else prompts
    return [prompt for prompt, _ in load_prompt_set(source, column, limit=limit)]


def evaluate_alignment(
    model: Any,
    lora: str | None,
    prompts: Sequence[str],
    scorers: Sequence[str | RewardScorer],
    seeds: Sequence[int] = (0,),
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    output_dir: str | Path | None = None,
    batch_size: int = 8,
    device: str | None = None,
    torch_dtype: torch.dtype | None = None,
    pipeline_kwargs: dict[str, Any] | None = None,
    frames_scored: int = 8,
    baseline: str | None = None,
) -> EvalResult:
    """Score base and (when `lora` is given) base + LoRA on every prompt x seed; write `results.json`, `grid.png` and
    `scores.png` to `output_dir` when given. A video pipeline (Wan) is scored by each image scorer averaged over
    `frames_scored` frames per video (and by `temporal_consistency` if named); the grid shows middle frames.

    Args:
        model: a diffusers pipeline, or its hub id / folder.
        lora: the training run's output to compare with the base: a LoRA folder or hub id, or the folder of a full
            fine-tune's denoiser, which replaces the pipeline's (`load_aligned_weights`); `None` scores the base only.
        scorers: names from `available_scorers()` or scorer objects.
        torch_dtype: the pipeline's dtype when loading it; default bfloat16 on a GPU, float32 on a CPU.
        pipeline_kwargs: extra arguments of every pipeline call (e.g. `height`, `width`, `num_frames`).
        baseline: another training run's output (same forms as `lora`) to compare `lora` with instead of the base,
            e.g. a Diffusion-DPO run against a Poly-DPO run: both generate from the same pipeline, prompts and seeds,
            the baseline's weights taken out again before `lora`'s go in.
    """
    from diffusers import DiffusionPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(model, (str, Path)):
        dtype = torch_dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
        pipe = DiffusionPipeline.from_pretrained(str(model), torch_dtype=dtype)
    else:
        pipe = model
    if baseline and not lora:
        raise ValueError("baseline: name the run to compare with it (lora); alone it would be the only model scored.")
    for weights in (lora, baseline):
        if weights:
            check_aligned_weights(weights, pipe)  # weights that do not fit are refused before anything is generated
    pipe.to(device)
    scorers = resolve_scorers(scorers, device=device)
    all_prompts = [p for p in prompts for _ in seeds]
    all_seeds = [int(s) for _ in prompts for s in seeds]
    generate = dict(
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        **(pipeline_kwargs or {}),
    )
    take_out = swap_in_aligned_weights(pipe, baseline) if baseline else None
    base_images = generate_images(pipe, all_prompts, all_seeds, **generate)
    if take_out is not None:
        take_out()
    if base_images and is_video(base_images[0]):
        scorers = [for_videos(scorer, frames_scored) for scorer in scorers]
    result = EvalResult(all_prompts, all_seeds, score_all(scorers, base_images, all_prompts))
    if baseline:
        labels = (run_label(baseline), run_label(lora))
        if labels[0] == labels[1]:  # e.g. two runs' checkpoint-500 folders
            labels = (baseline if baseline != lora else f"{baseline} (baseline)", lora)
        result.labels = labels
    aligned_images = None
    if lora:
        load_aligned_weights(pipe, lora)
        aligned_images = generate_images(pipe, all_prompts, all_seeds, **generate)
        result.aligned_scores = score_all(scorers, aligned_images, all_prompts)
        result.win_rates = {
            name: win_rate(torch.tensor(result.aligned_scores[name]), torch.tensor(result.base_scores[name]))
            for name in result.base_scores
        }
    if output_dir is not None:
        write_report(result, base_images, aligned_images, Path(output_dir))
    return result


def run_label(weights: str) -> str:
    """A short name for a training run's output in reports: its folder's name, or the hub id."""
    path = os.path.normpath(weights)
    return os.path.basename(path) if os.path.exists(path) else weights


def write_report(
    result: EvalResult, base_images: list[Image.Image], aligned_images: list[Image.Image] | None, out: Path
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2))
    (out / "results.md").write_text(result.table() + "\n")
    rows = {result.labels[0]: [_still(sample) for sample in base_images[:8]]}
    if aligned_images:
        rows[result.labels[1]] = [_still(sample) for sample in aligned_images[:8]]
    labelled_grid(rows, result.prompts[:8], cell=GRID_CELL).save(out / "grid.png")
    plot_scores(result, out / "scores.png")


def _still(sample: Any) -> Image.Image:
    """An image for the grid: the image itself, or a video's middle frame."""
    return sample[len(sample) // 2] if is_video(sample) else sample


def plot_scores(result: EvalResult, path: Path) -> None:
    """Per scorer: base and aligned mean score (bars), and the win rate with its interval (title)."""
    plt = pyplot_or_none(path.name)
    if plt is None:
        return

    names = list(result.base_scores)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        labels, values = [result.labels[0]], [result.mean(name, "base")]
        if name in result.aligned_scores:
            labels.append(result.labels[1])
            values.append(result.mean(name))
        ax.bar(labels, values, color=["#999999", "#3b7dd8"][: len(values)])
        title = name
        if name in result.win_rates:
            w = result.win_rates[name]
            title += f"\nwin {100 * w.rate:.0f}% [{100 * w.low:.0f}, {100 * w.high:.0f}]"
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class RewardEvalCallback(TrainerCallback):
    """Every `eval_steps` optimizer steps, generate with the model being trained on fixed prompts and seeds, score the
    images, and log each scorer's mean (`reward/<scorer>`) and win rate over the model at the start of training
    (`reward/<scorer>_win_rate`) to the trainer's reporters.

    Every process generates the same images (simple and correct under DDP; keep the prompt set small). Needs a model
    loaded with its encoders (not a latent-cache run).
    """

    def __init__(
        self,
        trainer: Any,
        prompts: Sequence[str],
        scorers: Sequence[str | RewardScorer],
        eval_steps: int = 500,
        seeds: Sequence[int] = (0,),
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
    ):
        pipe = trainer.family.pipeline
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "vae", None) is None:
            raise ValueError("RewardEvalCallback needs the pipeline's encoders; a latent-cache run does not load them.")
        self.trainer = trainer
        self.prompts = [p for p in prompts for _ in seeds]
        self.seeds = [int(s) for _ in prompts for s in seeds]
        self.scorers = resolve_scorers(scorers, device=str(trainer.accelerator.device))
        self.eval_steps = eval_steps
        self.generate = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        self.start_scores: dict[str, list[float]] | None = None

    def _scores(self) -> dict[str, list[float]]:
        denoiser = self.trainer.family.denoiser
        was_training = denoiser.training
        denoiser.eval()
        try:
            images = generate_images(self.trainer.family.pipeline, self.prompts, self.seeds, **self.generate)
        finally:
            denoiser.train(was_training)
        return score_all(self.scorers, images, self.prompts)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_scores = self._scores()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_steps:
            return
        scores = self._scores()
        logs: dict[str, float] = {}
        for name, values in scores.items():
            logs[f"reward/{name}"] = float(sum(values) / len(values))
            logs[f"reward/{name}_win_rate"] = win_rate(torch.tensor(values), torch.tensor(self.start_scores[name])).rate
        self.trainer.log(logs)
