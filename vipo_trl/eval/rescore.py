"""An existing preference set judged again by scorers: keep its labels and drop the pairs the scorers contradict (the
ViPO paper's consistency statistic used as a filter: five scorers agree with only 20.79% of Pick-a-Pic v2's labels),
or let the scorers choose each pair's winner (AI feedback, as the original Diffusion-DPO script's `--choice_model`).

    from vipo_trl.data.pairing import PairFilters
    from vipo_trl.eval import rescore_pairs
    result = rescore_pairs(
        load_dataset("parquet", data_files="pickapic_v2/*.parquet", split="train"),
        scorers=["pickscore", "hpsv2", "imagereward"],
        output_dir="pickapic-consistent",
        filters=PairFilters(consistent_only=True),    # keep the human label where every scorer agrees with it
    )

The pairs are read as training reads them (either schema, ties and bad rows skipped and counted) and written in the
generic schema with the same shards, filters, card and upload as `make_pairs` (`vipo-trl pairs --dataset_name`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.pairing import COMBINE_METHODS, PairFilters, PairsFolder, combine_scores, consistent_with_every_scorer
from .evaluate import resolve_scorers
from .judge import PairwiseScorer
from .pairs import PairsResult, _encode, _process_state, filters_for, finish_pairs, split_scorers
from .scorers import RewardScorer
from .video_scorers import for_videos, is_video

#: Per shard, the source rows skipped as training would skip them, by reason (read back by `finish_pairs`).
SKIPPED_FILE = "skipped-{:05d}.json"


def rescore_pairs(
    dataset: Any,
    scorers: Sequence[str | RewardScorer],
    output_dir: str | Path,
    *,
    options: Any = None,
    relabel: bool = False,
    combine: str = "weighted_sum",
    weights: Sequence[float] | None = None,
    margin: float = 0.0,
    filters: PairFilters | None = None,
    max_pairs: int | None = None,
    pairs_per_shard: int = 256,
    fps: int = 16,
    frames_scored: int = 8,
    describe: dict[str, Any] | None = None,
    push_to_hub: str | None = None,
    progress: bool = True,
) -> PairsResult | None:
    """Score both images of every pair of `dataset` and write the kept pairs as a new set; see the module docstring.

    Args:
        dataset: a `datasets.Dataset` or streaming `IterableDataset` in either preference schema, read with `options`
            (a `vipo_trl.data.DataOptions`; `PolyDPOConfig.data_options()` gives the trainer's).
        scorers: names or instances; point scorers score each image, a pairwise scorer (`vlm_judge`) compares the
            two (alone it decides; with point scorers it checks their winner, `PairFilters.judge_agrees`).
        relabel: `False` keeps the dataset's winner (`consistent` then says whether every scorer agrees with the
            label, and `score_margin` may be negative); `True` makes the scorers' combined score pick it, dropping
            pairs whose combined scores differ by no more than `margin`.
        combine, weights: how several scorers make one score (`vipo_trl.data.pairing.combine_scores`).
        filters: which pairs the written set keeps (`consistent_only`, `max_margin`, `balance`, `judge_agrees`).
        max_pairs: read at most this many rows of the source set (in order).
        pairs_per_shard: source rows per shard file (the unit of resuming a killed run).
        fps, frames_scored: for video pairs, the frame rate they are re-encoded at and the frames image scorers
            average over.
        describe: extra entries for the card's settings table; `source` names the set in the card's first line.
        push_to_hub: a dataset repo id to upload the set and card to.

    Under `accelerate launch` every process scores its share of the shards and the main process writes the set;
    returns it, or `None` on the other processes.
    """
    from ..data import DataOptions, pairs_from_options

    if combine not in COMBINE_METHODS:
        raise ValueError(f"combine={combine!r}: choose one of {COMBINE_METHODS}.")
    resolved = resolve_scorers(scorers)
    point, judge = split_scorers(resolved, weights)
    if pairs_per_shard < 1:
        raise ValueError(f"pairs_per_shard={pairs_per_shard}: a shard holds at least one row.")
    filters = filters_for(combine, filters)
    options = options or DataOptions()
    settings = {
        "source": "an existing preference set",  # the command line names it
        **(describe or {}),
        "labels": "scorers" if relabel else "dataset",
        "scorers": [s.name for s in resolved],
        "combine": combine,
        "weights": list(weights) if weights is not None else None,
        "margin": margin,
        "max_pairs": max_pairs,
        "pairs_per_shard": pairs_per_shard,
        "seed": options.seed,
    }
    folder = PairsFolder(output_dir)
    state = _process_state()
    if state.is_main_process:
        folder.check_settings(settings)
    state.wait_for_everyone()
    pairs = pairs_from_options(dataset, options, 1)
    from tqdm.auto import tqdm

    bar = tqdm(desc="rescoring pairs", unit="pair", disable=not progress or not state.is_main_process)

    def todo(shard: int) -> bool:  # this process's share (shard s on process s mod N), not written yet
        return shard % state.num_processes == state.process_index and not folder.has_shard(shard)

    for shard, items in _shards(pairs, pairs_per_shard, max_pairs, todo):
        skipped = Counter(item for item in items if isinstance(item, str))
        decoded = [item for item in items if not isinstance(item, str)]
        rows = _rescored_rows(decoded, point, judge, relabel, combine, weights, margin, fps, frames_scored)
        path = folder.shard_path(shard).with_name(SKIPPED_FILE.format(shard))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(skipped)))  # before the shard: a shard file means its counts exist too
        folder.write_shard(shard, rows)
        bar.update(len(items))
    bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return finish_pairs(folder.path, filters, push_to_hub=push_to_hub)


def _shards(pairs: Any, size: int, max_pairs: int | None, todo: Callable[[int], bool]) -> Iterator[tuple[int, list]]:
    """(shard index, that shard's rows: decoded pairs, or the reason a bad row is skipped) for each shard `todo` says
    to make. Shards are blocks of `size` usable rows (of a stream: rows read), so a resumed run, or another process,
    cuts them where the first run did."""
    from ..data.preference import PreferencePairs, decode_row, decoded_pairs

    if isinstance(pairs, PreferencePairs):  # rows are addressable: a finished shard is not even decoded again
        bound = len(pairs.dataset) if max_pairs is None else min(max_pairs, len(pairs.dataset))
        rows = [r for r in pairs.rows if r < bound]
        # Rows dropped on their labels alone (ties, bad labels) never reach `rows`; shard 0 counts them.
        label_skips = [reason for r, reason in pairs.label_skips if r < bound]
        dropped = label_skips + ["tie"] * (bound - len(rows) - len(label_skips))
        for shard in range(-(-len(rows) // size)):
            if todo(shard):
                items = list(decoded_pairs(pairs, rows[shard * size : (shard + 1) * size]))
                yield shard, (dropped + items if shard == 0 else items)
        return
    # A stream: shard s is rows [s * size, (s + 1) * size) as read; every process reads the whole stream (up to
    # max_pairs) but decodes only the rows of its own shards, one item (a pair or a skip reason) per row.
    items: list = []
    for row_index, row in enumerate(pairs.source):
        if max_pairs is not None and row_index >= max_pairs:
            break
        shard = row_index // size
        if todo(shard):
            items.append(decode_row(row, row_index, pairs.columns, pairs.options))
            if len(items) == size:
                yield shard, items
                items = []
    if items:
        yield shard, items


def _rescored_rows(
    decoded: list[dict[str, Any]],
    point: list[RewardScorer],
    judge: PairwiseScorer | None,
    relabel: bool,
    combine: str,
    weights: Sequence[float] | None,
    margin: float,
    fps: int,
    frames_scored: int,
) -> list[dict[str, Any]]:
    """The candidate pairs of one shard, before filters. Index 0 is the dataset's winner, 1 its loser."""
    if not decoded:
        return []
    video = is_video(decoded[0]["chosen"])
    scorers = [for_videos(s, frames_scored) if video else s for s in point]
    labelled = [(item["chosen"], item["rejected"]) for item in decoded]
    prompts = [item["prompt"] for item in decoded]
    scores = None  # [pairs, 2, scorers]
    if scorers:
        scores = torch.stack(
            [torch.stack([s.score([p[0] for p in labelled], prompts), s.score([p[1] for p in labelled], prompts)], 1)
             for s in scorers],
            dim=2,
        )  # fmt: skip

    orders, combined = [], []  # per pair: (winner, loser) as indices into (labelled winner, labelled loser)
    for n in range(len(decoded)):
        if scores is None:
            orders.append((0, 1) if not relabel else None)  # the judge orients the pair below
            combined.append((None, None))
            continue
        c = combine_scores(scores[n], combine, weights)
        combined.append((float(c[0]), float(c[1])))
        if not relabel:
            orders.append((0, 1))
        elif abs(float(c[0] - c[1])) > margin:
            orders.append((0, 1) if c[0] > c[1] else (1, 0))
        else:
            orders.append(None)  # the scorers cannot tell the two apart: no pair

    verdicts: list[int | None] = [None] * len(decoded)
    if judge is not None:
        if video:
            raise ValueError("vlm_judge compares images; for video pairs use point scorers.")
        asked = [n for n in range(len(decoded)) if orders[n] is not None or scores is None]
        first = [labelled[n][orders[n][0] if orders[n] else 0] for n in asked]
        second = [labelled[n][orders[n][1] if orders[n] else 1] for n in asked]
        for n, verdict in zip(asked, judge.compare(first, second, [prompts[n] for n in asked])):
            verdicts[n] = int(verdict)

    rows = []
    for n, item in enumerate(decoded):
        order, verdict = orders[n], verdicts[n]
        verdict_agrees = None if verdict is None else verdict > 0  # the judge's verdict on the labelled order
        if scores is None and relabel:  # the judge alone decides: no verdict, no pair
            if not verdict:
                continue
            order, verdict = ((0, 1) if verdict > 0 else (1, 0)), 1
        if order is None:
            continue
        w, lo = order
        sw, sl = combined[n][w], combined[n][lo]
        consistent = bool(verdict and verdict > 0) if scores is None else consistent_with_every_scorer(scores[n], w, lo)
        row = {
            "prompt": item["prompt"],
            "category": item.get("category"),
            "chosen": _encode(labelled[n][w], fps),
            "rejected": _encode(labelled[n][lo], fps),
            "chosen_score": sw,
            "rejected_score": sl,
            "score_margin": None if sw is None else sw - sl,
            "consistent": consistent,
            "judge": verdict,
            # Whether the scorers (or the judge) prefer the dataset's labelled winner, whichever winner is kept.
            "label_agrees": (combined[n][0] > combined[n][1]) if scores is not None else verdict_agrees,
            "source_row": item["row_index"],
        }
        for s, scorer in enumerate(scorers):
            row[f"chosen_{scorer.name}"] = float(scores[n, w, s])
            row[f"rejected_{scorer.name}"] = float(scores[n, lo, s])
        rows.append(row)
    return rows
