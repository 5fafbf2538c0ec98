"""Preference data from your own model: prompts -> several samples per prompt from one or more pipelines -> scores
from the registered scorers -> pairs by a stated rule -> filters -> a dataset in the generic schema, with a card.

    from vipo_trl.eval import make_pairs
    result = make_pairs(
        prompts="builtin",                     # or a .txt file, a dataset's column, a list of prompts
        pipelines=pipe,                        # or several: {"sd15": pipe, "sdxl": stronger}
        scorers=["pickscore", "hpsv2", "imagereward"],
        output_dir="my-pairs",
        samples_per_prompt=4,
        combine="rank_average",
        pairing="best_worst",
        filters=PairFilters(consistent_only=True, balance=True),
    )

The pure stages (combining scores, the pairing rule, the filters, the shard folder and the card) live in
`vipo_trl.data.pairing`; this module generates and scores. Under `accelerate launch` every process generates its
share of the shards and the main process writes the final set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.images import encode_png
from ..data.pairing import (
    COMBINE_METHODS,
    PAIRING_RULES,
    PairFilters,
    PairsFolder,
    PairsStats,
    combine_scores,
    consistent_with_every_scorer,
    pair_indices,
)
from ..data.prompts import load_prompt_set
from ..models.generation import generate_images
from .evaluate import resolve_scorers
from .judge import PairwiseScorer
from .scorers import RewardScorer
from .video_scorers import for_videos, is_video


@dataclass
class PairsResult:
    """The published pairs (a `datasets.Dataset`), what was kept and removed, and the output folder."""

    dataset: Any
    stats: PairsStats
    output_dir: Path


def sample_seed(seed: int, prompt_index: int, sample_index: int, samples_per_prompt: int) -> int:
    """The generator seed of one sample: fixed by the run's seed and the sample's place, not by the process or shard
    that draws it, so a resumed or multi-process build draws the same samples."""
    return (seed * 1_000_003 + prompt_index * samples_per_prompt + sample_index) % 2**63


def prompts_per_batch(batch_size: int, samples_per_prompt: int, pipelines: int = 1) -> int:
    """How many prompts `make_pairs` generates at once: as many whole prompts' samples (per pipeline) as fit in
    `batch_size`, at least one."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: generate at least one sample at a time.")
    per_pipeline = -(-samples_per_prompt // pipelines)
    return max(1, batch_size // per_pipeline)


def make_pairs(
    prompts: Any,
    pipelines: Any,
    scorers: Sequence[str | RewardScorer],
    output_dir: str | Path,
    *,
    samples_per_prompt: int = 4,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    pipeline_kwargs: dict[str, Any] | None = None,
    combine: str = "weighted_sum",
    weights: Sequence[float] | None = None,
    pairing: str = "best_worst",
    margin: float = 0.0,
    filters: PairFilters | None = None,
    prompts_per_shard: int = 16,
    batch_size: int = 8,
    seed: int = 0,
    fps: int = 16,
    frames_scored: int = 8,
    describe: dict[str, Any] | None = None,
    push_to_hub: str | None = None,
    progress: bool = True,
) -> PairsResult | None:
    """Generate, score, pair, filter and write a preference set; see the module docstring.

    Args:
        prompts: anything `load_prompt_set` takes.
        pipelines: one diffusers pipeline, a list, or a dict name -> pipeline; sample k of a prompt comes from
            pipeline k mod (number of pipelines).
        scorers: names or instances. Point scorers (`score(images, prompts)`) order the samples; a pairwise scorer
            (`vlm_judge`) compares pairs: alone it orders every pair of a prompt's samples, with point scorers it
            checks their pairs (`PairFilters.judge_agrees`). For video pipelines image scorers are averaged over
            `frames_scored` frames.
        combine, weights: how several scorers make one score (`vipo_trl.data.pairing.combine_scores`).
        pairing, margin: which samples are paired (`vipo_trl.data.pairing.pair_indices`).
        filters: which pairs the published set keeps; `combine="all_agree"` implies `consistent_only`.
        prompts_per_shard: prompts per shard file (rounded up to whole batches of prompts); a killed build reruns
            only the shard in progress.
        batch_size: samples generated at once. Whole prompts are batched together, `batch_size // samples per
            pipeline` at a time (one prompt's samples in several calls when they do not fit), in fixed blocks of
            prompt indices: a batch's make-up, and so the set, does not depend on the shard size or the number
            of processes.
        describe: extra entries for the card's settings table (e.g. model ids).
        push_to_hub: a dataset repo id to upload the set and card to.

    Returns the published set, or `None` on the non-main processes of a multi-process run.
    """
    if combine not in COMBINE_METHODS:
        raise ValueError(f"combine={combine!r}: choose one of {COMBINE_METHODS}.")
    if pairing not in PAIRING_RULES:
        raise ValueError(f"pairing={pairing!r}: choose one of {PAIRING_RULES}.")
    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt={samples_per_prompt}: pairs need at least 2 samples per prompt.")
    items = load_prompt_set(prompts)
    pipes = pipelines if isinstance(pipelines, dict) else {}
    if not pipes:
        listed = list(pipelines) if isinstance(pipelines, (list, tuple)) else [pipelines]
        pipes = {f"pipeline_{k}" if len(listed) > 1 else "pipeline": p for k, p in enumerate(listed)}
    resolved = resolve_scorers(scorers)
    point, judge = split_scorers(resolved, weights)
    filters = filters_for(combine, filters)

    settings = {
        "prompts": len(items),
        "pipelines": list(pipes),
        **(describe or {}),
        "samples_per_prompt": samples_per_prompt,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "pipeline_kwargs": pipeline_kwargs or {},
        "scorers": [s.name for s in resolved],
        "combine": combine,
        "weights": list(weights) if weights is not None else None,
        "pairing": pairing,
        "margin": margin,
        "prompts_per_shard": prompts_per_shard,
        "batch_size": batch_size,
        "seed": seed,
    }
    block = prompts_per_batch(batch_size, samples_per_prompt, len(pipes))
    prompts_per_shard = -(-prompts_per_shard // block) * block  # a shard holds whole blocks
    folder = PairsFolder(output_dir)
    state = _process_state()
    if state.is_main_process:
        folder.check_settings(settings)
    state.wait_for_everyone()

    shards = range(0, -(-len(items) // prompts_per_shard))
    mine = [s for s in shards if s % state.num_processes == state.process_index and not folder.has_shard(s)]
    from tqdm.auto import tqdm

    for shard in tqdm(mine, desc="pairs (shards)", unit="shard", disable=not progress or not state.is_main_process):
        first = shard * prompts_per_shard
        chunk = items[first : first + prompts_per_shard]
        rows = _shard_rows(
            chunk, first, pipes, point, judge,
            samples_per_prompt=samples_per_prompt, steps=num_inference_steps, guidance=guidance_scale,
            pipeline_kwargs=pipeline_kwargs or {}, combine=combine, weights=weights, pairing=pairing, margin=margin,
            batch_size=batch_size, block=block, seed=seed, fps=fps, frames_scored=frames_scored,
        )  # fmt: skip
        folder.write_shard(shard, rows)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return finish_pairs(folder.path, filters, push_to_hub=push_to_hub)


def split_scorers(
    scorers: Sequence[RewardScorer], weights: Sequence[float] | None = None
) -> tuple[list[RewardScorer], PairwiseScorer | None]:
    """The point scorers and the pairwise judge (at most one) among `scorers`, with one weight per point scorer."""
    judges = [s for s in scorers if isinstance(s, PairwiseScorer)]
    point = [s for s in scorers if not isinstance(s, PairwiseScorer)]
    if not point and not judges:
        raise ValueError("scorers: name at least one scorer (e.g. 'pickscore', or 'vlm_judge').")
    if len(judges) > 1:
        raise ValueError("scorers: one pairwise judge at most.")
    if weights is not None and len(weights) != len(point):
        raise ValueError(f"weights: {len(weights)} weights for {len(point)} scorers; give one per scorer.")
    return point, judges[0] if judges else None


def filters_for(combine: str, filters: PairFilters | None) -> PairFilters:
    """`filters` (default: `PairFilters()`), with `consistent_only` on under `combine="all_agree"`."""
    filters = filters or PairFilters()
    if combine == "all_agree":
        filters.consistent_only = True
    return filters


def finish_pairs(
    output_dir: str | Path, filters: PairFilters | None = None, push_to_hub: str | None = None
) -> PairsResult:
    """Apply `filters` to every shard's candidate pairs and write the published set and its card (run again with
    other filters without generating again)."""
    import json

    from datasets import Dataset

    folder = PairsFolder(output_dir)
    settings = json.loads((folder.path / "pairs_settings.json").read_text())
    rows = folder.read_shards()
    kept, stats = _apply_filters_or_explain(rows, filters or PairFilters())
    for path in sorted((folder.path / "shards").glob("skipped-*.json")):  # written by rescore_pairs
        for reason, count in json.loads(path.read_text()).items():
            stats.skipped_rows[reason] = stats.skipped_rows.get(reason, 0) + count
    if kept:
        from ..data.video import looks_like_video

        settings["video"] = looks_like_video(kept[0]["chosen"])
    folder.write_dataset(kept)
    folder.write_card(stats, settings, filters or PairFilters())
    if push_to_hub:
        folder.push_to_hub(push_to_hub)
    return PairsResult(Dataset.from_list(kept) if kept else Dataset.from_dict({}), stats, folder.path)


def _apply_filters_or_explain(rows: list[dict[str, Any]], filters: PairFilters):
    from ..data.pairing import apply_filters

    kept, stats = apply_filters(rows, filters)
    if rows and not kept:
        raise ValueError(
            f"every one of the {len(rows)} candidate pairs was filtered out ({stats.removed}); relax the filters "
            "(consistent_only, max_margin) or draw more samples_per_prompt."
        )
    return kept, stats


def _shard_rows(
    chunk: list[tuple[str, str | None]],
    first: int,
    pipes: dict[str, Any],
    point: list[RewardScorer],
    judge: PairwiseScorer | None,
    *,
    samples_per_prompt: int,
    steps: int,
    guidance: float,
    pipeline_kwargs: dict[str, Any],
    combine: str,
    weights: Sequence[float] | None,
    pairing: str,
    margin: float,
    batch_size: int,
    block: int,
    seed: int,
    fps: int,
    frames_scored: int,
) -> list[dict[str, Any]]:
    """Generate, score and pair one shard's prompts: the candidate pairs, before filters."""
    names = list(pipes)
    plan = [  # (prompt index in chunk, sample index, pipeline name, seed)
        (i, k, names[k % len(names)], sample_seed(seed, first + i, k, samples_per_prompt))
        for i in range(len(chunk))
        for k in range(samples_per_prompt)
    ]
    samples: dict[tuple[int, int], Any] = {}
    # `block` prompts per batch, blocks fixed by prompt index (`first` is a multiple of `block`): a batch's make-up
    # then does not depend on how prompts are split into shards or processes (batched kernels round differently at
    # other batch sizes, e.g. on one thread).
    for name in names:
        for start in range(0, len(chunk), block):
            todo = [p for p in plan if p[2] == name and start <= p[0] < start + block]
            made = generate_images(
                pipes[name], [chunk[i][0] for i, *_ in todo], [s for *_, s in todo], num_inference_steps=steps,
                guidance_scale=guidance, batch_size=batch_size, **pipeline_kwargs,
            ) if todo else []  # fmt: skip
            samples.update({(i, k): sample for (i, k, _, _), sample in zip(todo, made)})
    video = is_video(next(iter(samples.values())))
    scorers = [for_videos(s, frames_scored) if video else s for s in point]
    ordered = [samples[(i, k)] for i, k, _, _ in plan]
    prompts = [chunk[i][0] for i, *_ in plan]
    scores = torch.stack([s.score(ordered, prompts) for s in scorers], dim=1) if scorers else None

    candidates = []  # (prompt index, winner k, loser k, combined winner, combined loser)
    for i in range(len(chunk)):
        rows_of_prompt = slice(i * samples_per_prompt, (i + 1) * samples_per_prompt)
        if scores is not None:
            combined = combine_scores(scores[rows_of_prompt], combine, weights)
            for w, lo in pair_indices(combined, pairing, margin):
                candidates.append((i, w, lo, float(combined[w]), float(combined[lo])))
        else:  # the judge alone orders every pair of the prompt's samples
            candidates += [
                (i, a, b, None, None) for a in range(samples_per_prompt) for b in range(a + 1, samples_per_prompt)
            ]
    verdicts: list[int | None] = [None] * len(candidates)
    if judge is not None and candidates:
        if video:
            raise ValueError("vlm_judge compares images; for video pipelines use point scorers.")
        result = judge.compare(
            [samples[(i, w)] for i, w, *_ in candidates],
            [samples[(i, lo)] for i, _, lo, *_ in candidates],
            [chunk[i][0] for i, *_ in candidates],
        )
        verdicts = [int(v) for v in result]

    rows = []
    for (i, w, lo, sw, sl), verdict in zip(candidates, verdicts):
        if scores is None:  # judge only: its verdict orients the pair, no verdict leaves no pair
            if verdict == 0:
                continue
            if verdict < 0:
                w, lo = lo, w
            verdict = 1
        prompt, category = chunk[i]
        winner, loser = i * samples_per_prompt + w, i * samples_per_prompt + lo
        row = {
            "prompt": prompt,
            "category": category,
            "chosen": _encode(samples[(i, w)], fps),
            "rejected": _encode(samples[(i, lo)], fps),
            "chosen_score": sw,
            "rejected_score": sl,
            "score_margin": None if sw is None else sw - sl,
            "consistent": bool(verdict) if scores is None else consistent_with_every_scorer(scores, winner, loser),
            "judge": verdict,
            "chosen_generator": plan[winner][2],
            "rejected_generator": plan[loser][2],
            "chosen_seed": plan[winner][3],
            "rejected_seed": plan[loser][3],
        }
        for s, scorer in enumerate(scorers):
            row[f"chosen_{scorer.name}"] = float(scores[winner, s])
            row[f"rejected_{scorer.name}"] = float(scores[loser, s])
        rows.append(row)
    return rows


def _encode(sample: Any, fps: int) -> bytes:
    if is_video(sample):
        from ..data.video import encode_video

        return encode_video(sample, fps=fps)
    return encode_png(sample)


class _SingleProcess:
    is_main_process, num_processes, process_index = True, 1, 0

    def wait_for_everyone(self) -> None:
        pass


def _process_state() -> Any:
    """accelerate's process state under `accelerate launch` (several processes), else a single process."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        # without CUDA, accelerate sets up the processes only when told they run on the CPU (gloo)
        return PartialState(cpu=not torch.cuda.is_available())
    return _SingleProcess()
