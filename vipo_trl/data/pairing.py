"""From scored samples to a published preference set: how scores are combined, which samples are paired, which pairs
are kept (scorer consistency, easy pairs, category balance), and the output folder: parquet shards written one at a
time (a crash loses at most the shard in progress), the final set in the generic schema, and its dataset card.

These are the data-side stages of `vipo_trl.eval.make_pairs`, which generates and scores the samples; each stage is a
plain function over tensors and rows, so a researcher can swap one without touching the others.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

COMBINE_METHODS = ("weighted_sum", "rank_average", "all_agree")
PAIRING_RULES = ("best_worst", "all_pairs")
SHARDS_FOLDER, DATA_FOLDER, SETTINGS_FILE, STATS_FILE = "shards", "data", "pairs_settings.json", "pairs_stats.json"


# ---------------------------------------------------------------------------------------------- combine and pair


def combine_scores(
    scores: torch.Tensor, method: str = "weighted_sum", weights: Sequence[float] | None = None
) -> torch.Tensor:
    """One score per sample from `scores` [samples, scorers] of one prompt's samples.

    * `weighted_sum`: sum of each scorer's score times its weight (default 1 each); scales differ between scorers
      (PickScore ~20, aesthetic ~5), so set `weights` when mixing them.
    * `rank_average` and `all_agree`: the mean over scorers of each sample's rank among the prompt's samples (0 =
      worst), which puts every scorer on the same scale; `all_agree` also keeps only pairs every scorer orders the
      same way (`consistent_with_every_scorer`).
    """
    if method not in COMBINE_METHODS:
        raise ValueError(f"combine={method!r}: choose one of {COMBINE_METHODS}.")
    if scores.ndim != 2:
        raise ValueError(f"scores must be [samples, scorers]; got shape {tuple(scores.shape)}.")
    if method == "weighted_sum":
        w = torch.ones(scores.shape[1]) if weights is None else torch.as_tensor(list(weights), dtype=scores.dtype)
        if w.numel() != scores.shape[1]:
            raise ValueError(f"weights: {w.numel()} weights for {scores.shape[1]} scorers; give one per scorer.")
        return (scores * w).sum(dim=1)
    ranks = scores.argsort(dim=0).argsort(dim=0).to(scores.dtype)  # ties broken by position; rank 0 = lowest
    return ranks.mean(dim=1)


def pair_indices(combined: torch.Tensor, rule: str = "best_worst", margin: float = 0.0) -> list[tuple[int, int]]:
    """(winner, loser) sample indices within one prompt.

    * `best_worst`: the best sample against the worst, if they differ by more than `margin`.
    * `all_pairs`: every pair whose combined scores differ by more than `margin`, the larger margins first.
    """
    if rule not in PAIRING_RULES:
        raise ValueError(f"pairing={rule!r}: choose one of {PAIRING_RULES}.")
    n = combined.numel()
    if n < 2:
        return []
    if rule == "best_worst":
        best, worst = int(combined.argmax()), int(combined.argmin())
        return [(best, worst)] if float(combined[best] - combined[worst]) > margin else []
    pairs = [
        (i, j) if combined[i] > combined[j] else (j, i)
        for i in range(n)
        for j in range(i + 1, n)
        if abs(float(combined[i] - combined[j])) > margin
    ]
    return sorted(pairs, key=lambda p: -float(combined[p[0]] - combined[p[1]]))


def consistent_with_every_scorer(scores: torch.Tensor, winner: int, loser: int) -> bool:
    """Whether every scorer (a column of `scores` [samples, scorers]) scores the winner strictly higher: the paper's
    consistency (only 20.79% of Pick-a-Pic v2's pairs are ranked the same way by five scorers)."""
    return bool((scores[winner] > scores[loser]).all())


def balance_categories(rows: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """As many pairs of every category as the smallest category has (a seeded random subset of each larger one);
    rows keep their order. Rows without a category count as one category, `None`."""
    by_category: dict[Any, list[int]] = {}
    for index, row in enumerate(rows):
        by_category.setdefault(row.get("category"), []).append(index)
    if len(by_category) < 2:
        return list(rows)
    smallest = min(len(indices) for indices in by_category.values())
    generator = torch.Generator().manual_seed(seed)
    keep: set[int] = set()
    for indices in by_category.values():
        order = torch.randperm(len(indices), generator=generator)[:smallest]
        keep.update(indices[int(k)] for k in order)
    return [row for index, row in enumerate(rows) if index in keep]


@dataclass
class PairFilters:
    """Which candidate pairs the published set keeps (applied after all shards exist, so they can change without
    generating again).

    Args:
        consistent_only: keep only pairs every scorer orders the same way.
        max_margin: drop pairs whose combined-score margin is above this (too easy to tell apart).
        balance: keep as many pairs of each category as the smallest category has.
        judge_agrees: with a pairwise judge, keep only pairs it confirms (an order-consistent verdict for the winner).
        seed: the seed of the balancing subset.
    """

    consistent_only: bool = False
    max_margin: float | None = None
    balance: bool = False
    judge_agrees: bool = True
    seed: int = 0


@dataclass
class PairsStats:
    """What a pair set holds: candidate and kept pairs, what each filter removed, pairs per category, score margins
    and the share of candidate pairs every scorer agreed on."""

    candidate_pairs: int = 0
    pairs: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    per_category: dict[str, int] = field(default_factory=dict)
    margin: dict[str, float] = field(default_factory=dict)
    consistency: float | None = None
    judge_confirmed: float | None = None
    label_agreement: float | None = None  # rescored sets: the share of candidates whose scorers prefer the label
    skipped_rows: dict[str, int] = field(default_factory=dict)  # rescored sets: source rows skipped, by reason

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def apply_filters(rows: list[dict[str, Any]], filters: PairFilters) -> tuple[list[dict[str, Any]], PairsStats]:
    """The kept rows and the statistics of what was kept and removed."""
    stats = PairsStats(candidate_pairs=len(rows))
    if rows:
        stats.consistency = sum(bool(r["consistent"]) for r in rows) / len(rows)
        labelled = [r for r in rows if r.get("label_agrees") is not None]
        if labelled:
            stats.label_agreement = sum(bool(r["label_agrees"]) for r in labelled) / len(labelled)
        judged = [r for r in rows if r.get("judge") is not None]
        if judged:
            stats.judge_confirmed = sum(r["judge"] > 0 for r in judged) / len(judged)
    kept = rows
    if filters.judge_agrees:
        before = len(kept)
        kept = [r for r in kept if r.get("judge") is None or r["judge"] > 0]
        stats.removed["judge_disagrees_or_order_inconsistent"] = before - len(kept)
    if filters.consistent_only:
        before = len(kept)
        kept = [r for r in kept if r["consistent"]]
        stats.removed["scorers_disagree"] = before - len(kept)
    if filters.max_margin is not None:
        before = len(kept)
        kept = [r for r in kept if r["score_margin"] is None or r["score_margin"] <= filters.max_margin]
        stats.removed["too_easy"] = before - len(kept)
    if filters.balance:
        before = len(kept)
        kept = balance_categories(kept, filters.seed)
        stats.removed["category_balance"] = before - len(kept)
    stats.pairs = len(kept)
    for row in kept:
        key = str(row.get("category"))
        stats.per_category[key] = stats.per_category.get(key, 0) + 1
    margins = [float(r["score_margin"]) for r in kept if r["score_margin"] is not None]
    if margins:
        stats.margin = {
            "mean": statistics.fmean(margins),
            "median": statistics.median(margins),
            "min": min(margins),
            "max": max(margins),
        }
    return kept, stats


# ---------------------------------------------------------------------------------------------- the output folder


class PairsFolder:
    """The output folder of a pair-set build:

    pairs_settings.json     what generated the candidates (a rerun with other settings is refused)
    shards/shard-00000.parquet ...   candidate pairs, one file per block of prompts, each written atomically
    data/train-00000-of-00001.parquet ...   the published set (filters applied)
    pairs_stats.json, README.md     statistics and the dataset card
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Write the generation settings, or check them against the ones the folder's shards were made with."""
        file = self.path / SETTINGS_FILE
        settings = json.loads(json.dumps(settings))  # as it reads back
        if file.exists():
            saved = json.loads(file.read_text())
            if saved != settings:
                changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
                raise ValueError(
                    f"{self.path} holds shards made with other settings ({', '.join(changed)} differ). Use another "
                    "output folder, or delete its shards folder and pairs_settings.json to start again."
                )
            return
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write(file, json.dumps(settings, indent=2).encode())

    def shard_path(self, index: int) -> Path:
        return self.path / SHARDS_FOLDER / f"shard-{index:05d}.parquet"

    def has_shard(self, index: int) -> bool:
        return self.shard_path(index).exists()

    def write_shard(self, index: int, rows: list[dict[str, Any]]) -> None:
        """One shard's candidate pairs (possibly none), written to a temporary file and renamed into place."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.shard_path(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(rows) if rows else pa.table({"prompt": pa.array([], pa.string())})
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)

    def read_shards(self) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        rows: list[dict[str, Any]] = []
        for path in sorted((self.path / SHARDS_FOLDER).glob("shard-*.parquet")):
            rows += pq.read_table(path).to_pylist()
        return rows

    def write_dataset(self, rows: list[dict[str, Any]], rows_per_file: int = 1000) -> list[Path]:
        """The published set as `data/train-XXXXX-of-YYYYY.parquet` (the layout `load_dataset` reads by itself)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = self.path / DATA_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("train-*.parquet"):
            old.unlink()
        count = max(1, -(-len(rows) // rows_per_file))
        paths = []
        for k in range(count):
            chunk = rows[k * rows_per_file : (k + 1) * rows_per_file]
            path = folder / f"train-{k:05d}-of-{count:05d}.parquet"
            tmp = path.with_suffix(".parquet.tmp")
            table = pa.Table.from_pylist(chunk) if chunk else pa.table({"prompt": pa.array([], pa.string())})
            pq.write_table(table, tmp)
            os.replace(tmp, path)
            paths.append(path)
        return paths

    def write_card(self, stats: PairsStats, settings: dict[str, Any], filters: PairFilters) -> Path:
        path = self.path / "README.md"
        _atomic_write(path, dataset_card(stats, settings, filters).encode())
        _atomic_write(self.path / STATS_FILE, json.dumps(stats.to_dict(), indent=2).encode())
        return path

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None) -> str:
        """Upload the published set and its card (not the shards) as a dataset repo; returns its URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="dataset",
            folder_path=str(self.path),
            allow_patterns=[f"{DATA_FOLDER}/*.parquet", "README.md", STATS_FILE],
            commit_message="Upload preference pairs made with vipo-trl",
        )
        return str(url)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def dataset_card(stats: PairsStats, settings: dict[str, Any], filters: PairFilters) -> str:
    """A dataset card: tags, counts per category, margins, consistency, and the settings that made the set.

    The header names no `configs`: `data/train-*.parquet` is the layout `datasets` and the Hub find by themselves, and
    a local folder whose card lists `data_files` is cached by `datasets` under the folder's name and those relative
    paths, so a second set in a folder of the same name (or a rebuilt one) would load the first one's rows."""
    lines = [
        "---",
        "tags:",
        "- vipo-trl",
        "- preference",
        "- text-to-video" if settings.get("video") else "- text-to-image",
        "---",
        "",
        "# Preference pairs made with vipo-trl",
        "",
        f"{stats.pairs} pairs in the generic schema (`prompt`, `chosen`, `rejected`, scores, `category`), made by "
        + (
            f"scoring both images of every pair of {settings['source']} again and keeping "
            + ("the scorers' winner" if settings.get("labels") == "scorers" else "its labelled winner")
            + " (`vipo-trl pairs --dataset_name`)."
            if settings.get("source")
            else "generating several samples per prompt, scoring them and pairing them (`vipo-trl pairs`)."
        )
        + " Train on it with `vipo-trl train --dataset_name <this repo>`.",
        "",
        "## Pairs per category",
        "",
        "| category | pairs |",
        "|---|---|",
        *[f"| {name} | {count} |" for name, count in sorted(stats.per_category.items())],
        "",
        "## Scores",
        "",
    ]
    if stats.margin:
        m = stats.margin
        lines.append(
            f"Combined-score margin (chosen minus rejected): mean {m['mean']:.4g}, median {m['median']:.4g}, "
            f"min {m['min']:.4g}, max {m['max']:.4g}."
        )
    if stats.consistency is not None:
        lines.append(
            f"Consistency: {100 * stats.consistency:.1f}% of the {stats.candidate_pairs} candidate pairs are ordered "
            "the same way by every scorer."
        )
    if stats.label_agreement is not None:
        lines.append(
            f"The scorers prefer the source set's labelled winner in {100 * stats.label_agreement:.1f}% of the "
            "candidate pairs."
        )
    if stats.skipped_rows:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(stats.skipped_rows.items()))
        lines.append(f"Source rows skipped as training would skip them: {skipped}.")
    if stats.judge_confirmed is not None:
        lines.append(f"Pairwise judge: confirmed {100 * stats.judge_confirmed:.1f}% of the judged candidate pairs.")
    removed = ", ".join(f"{k}: {v}" for k, v in stats.removed.items() if v) or "none"
    lines += [
        f"Removed by filters: {removed}.",
        "",
        "## How it was made",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {_cell(v)} |" for k, v in settings.items()],
        *[f"| filter: {k} | {_cell(v)} |" for k, v in asdict(filters).items()],
        "",
    ]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return (json.dumps(value) if not isinstance(value, str) else value).replace("|", "\\|")


CombineMethod = Literal["weighted_sum", "rank_average", "all_agree"]
PairingRule = Literal["best_worst", "all_pairs"]
