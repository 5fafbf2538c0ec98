"""Preference pairs from a `datasets.Dataset` (or a streaming `IterableDataset`) in Pick-a-Pic v2's schema or the
generic prompt/chosen/rejected one."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import ImageChops
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import IterableDataset as TorchIterableDataset
from torch.utils.data import get_worker_info

from ..utils import stable_seed
from .images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BadRow,
    ImageTooLarge,
    Media,
    PreferenceDataError,
    decode_media,
    media_size,
    paired_transform,
)
from .sampling import nearest_bucket, resolve_buckets
from .video import MissingDependency

logger = logging.getLogger(__name__)

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
#: How many following rows a map-style dataset tries in place of a bad one before giving up.
MAX_SUBSTITUTIONS = 32


@dataclass(frozen=True)
class PreferenceColumns:
    """Where a dataset keeps the prompt and the two images, and in which schema."""

    schema: str  # "pickapic" or "generic"
    prompt: str
    first: str  # generic: chosen; Pick-a-Pic: jpg_0
    second: str  # generic: rejected; Pick-a-Pic: jpg_1
    category: str | None = None


@dataclass(frozen=True)
class DataOptions:
    """How rows become pairs: schema and columns, preprocessing, bad-row policy (`PolyDPOConfig.data_options()`
    fills it; the data layer reads nothing else)."""

    dataset_schema: str = "auto"
    prompt_column: str | None = None
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    category_column: str | None = None
    resolution: int = 512
    aspect_ratio_buckets: str | None = None  # as given: None, "auto" or "h,w;h,w"
    drop_ties: bool = True
    strict: bool = False
    seed: int = 0
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    num_frames: int | None = None
    fps: float | None = None
    buckets: tuple[tuple[int, int], ...] | None = None  # aspect-ratio buckets (height, width); None: square crops

    def columns_of(self, column_names: Sequence[str]) -> PreferenceColumns:
        """The schema and columns these options pick in a dataset with `column_names` (`resolve_columns`)."""
        return resolve_columns(
            list(column_names),
            self.dataset_schema,
            self.prompt_column,
            self.chosen_column,
            self.rejected_column,
            self.category_column,
        )


def resolve_columns(
    column_names: list[str],
    schema: str = "auto",
    prompt_column: str | None = None,
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    category_column: str | None = None,
) -> PreferenceColumns:
    """Decide the schema and check that its columns exist, with an error that names what is missing."""
    names = set(column_names)
    if schema == "auto":
        # Any Pick-a-Pic column means Pick-a-Pic, so a missing one is named rather than the generic columns.
        schema = "pickapic" if {"jpg_0", "jpg_1", "label_0", "label_1"} & names else "generic"
    if schema == "pickapic":
        columns = PreferenceColumns("pickapic", prompt_column or "caption", "jpg_0", "jpg_1", category_column)
        required = [columns.prompt, "jpg_0", "jpg_1", "label_0", "label_1"]
    elif schema == "generic":
        columns = PreferenceColumns(
            "generic", prompt_column or "prompt", chosen_column, rejected_column, category_column
        )
        required = [columns.prompt, chosen_column, rejected_column]
    else:
        raise ValueError(f"dataset_schema={schema!r}: expected 'auto', 'pickapic' or 'generic'.")
    if category_column:
        required.append(category_column)
    missing = [c for c in required if c not in names]
    if missing:
        raise PreferenceDataError(
            f"The dataset lacks column(s) {missing} needed by the {schema} schema (it has {sorted(names)}). "
            "Rename the columns, or set PolyDPOConfig.prompt_column / chosen_column / rejected_column / "
            "category_column (or dataset_schema) to match."
        )
    return columns


def pickapic_winner(label_0: Any, label_1: Any, row_index: int) -> bool | None:
    """True if `jpg_0` won, False if `jpg_1` won, None for a tie. Anything but win/lose/tie is a `BadRow`."""
    try:
        l0, l1 = float(label_0), float(label_1)
    except (TypeError, ValueError):
        l0 = l1 = math.nan
    if (l0, l1) == (1.0, 0.0):
        return True
    if (l0, l1) == (0.0, 1.0):
        return False
    if math.isfinite(l0) and l0 == l1:
        return None
    raise BadRow(
        "bad_label",
        f"Row {row_index}: label_0={label_0!r}, label_1={label_1!r}; Pick-a-Pic labels must be a win (1, 0), a loss "
        "(0, 1) or a tie (equal).",
    )


def load_pair(row: dict[str, Any], row_index: int, columns: PreferenceColumns, options: DataOptions) -> dict[str, Any]:
    """Decode one row into `{row_index, prompt, chosen, rejected, category}`; a row that cannot be trained on raises
    `BadRow` naming the row, the column and the reason. Ties must have been filtered out before."""
    c = columns
    winner, loser = c.first, c.second
    if c.schema == "pickapic" and pickapic_winner(row["label_0"], row["label_1"], row_index) is False:
        winner, loser = c.second, c.first
    prompt = row[c.prompt]
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRow("empty_prompt", f"Row {row_index}, column {c.prompt!r}: the prompt is empty or not a string.")
    media = {}
    for role, column in (("chosen", winner), ("rejected", loser)):
        try:
            media[role] = decode_media(row[column], options.max_image_pixels, options.num_frames, options.fps)
        except ImageTooLarge as exc:
            raise BadRow("too_large", f"Row {row_index}, column {column!r}: {exc}.") from exc
        except MissingDependency:
            raise
        except Exception as exc:  # PIL and PyAV raise many types for bad files; all mean the same to the user
            raise BadRow(
                "undecodable", f"Row {row_index}, column {column!r}: cannot decode the image or video ({exc})."
            ) from exc
    chosen, rejected = media["chosen"], media["rejected"]
    if isinstance(chosen, list) != isinstance(rejected, list) or (
        isinstance(chosen, list) and len(chosen) != len(rejected)
    ):
        raise BadRow("size_mismatch", f"Row {row_index}: chosen and rejected are not the same kind or length.")
    first_c, first_r = (chosen[0], rejected[0]) if isinstance(chosen, list) else (chosen, rejected)
    if abs((first_c.width / first_c.height) / (first_r.width / first_r.height) - 1) > 0.01:
        raise BadRow(
            "size_mismatch",
            f"Row {row_index}: chosen is {first_c.width}x{first_c.height} but rejected is "
            f"{first_r.width}x{first_r.height}; one crop cannot fit both without distorting one.",
        )
    if _same_media(chosen, rejected):
        # Same noise, same image: every reference-based loss sees a zero margin and gives no gradient, yet the row
        # would fill a batch place; a preference needs two different images.
        raise BadRow("identical", f"Row {row_index}: chosen and rejected are the same image; no preference to learn.")
    category = row[c.category] if c.category else None
    return {"row_index": row_index, "prompt": prompt, "chosen": chosen, "rejected": rejected, "category": category}


def _same_media(first: Media, second: Media) -> bool:
    """Pixel-identical images (or videos, frame by frame), however they were stored."""
    firsts, seconds = (first, second) if isinstance(first, list) else ([first], [second])
    # A difference image's bounding box is None only when every pixel of every band is equal: computed in C without
    # the two `tobytes()` copies (0.19 ms against 0.84 ms per 1024-px pair, paid on every training step).
    return all(
        a.size == b.size and a.mode == b.mode and ImageChops.difference(a, b).getbbox() is None
        for a, b in zip(firsts, seconds)
    )


def _with_augment_seed(item: dict[str, Any], options: DataOptions, epoch: int) -> dict[str, Any]:
    item["augment_seed"] = stable_seed(options.seed, "augment", epoch, item["row_index"])
    if options.buckets:
        first = item["chosen"][0] if isinstance(item["chosen"], list) else item["chosen"]
        item["target_size"] = nearest_bucket(first.height, first.width, list(options.buckets))
    return item


class PreferencePairs(TorchDataset):
    """A view of a `datasets.Dataset` that yields one decoded preference pair per usable row.

    Pick-a-Pic rows are oriented so the winner is `chosen` (`label_0 == 0` means `jpg_1` won); ties are dropped
    (counted in `num_ties`) or refused. A row that cannot be used (bad label, empty prompt, undecodable or oversized
    image, mismatched pair) is skipped and reported in the item's `skipped` list, its place taken by the next usable
    row; with `options.strict` it raises instead. Each item keeps its `row_index` in the source dataset, which names
    the row in errors and seeds the pair's noise and timestep, and an `augment_seed` for its crop and flip that
    depends on `(seed, epoch, row)` only, so a resumed or multi-process run sees the same augmentation. The trainer
    calls `set_epoch` at the start of every epoch.
    """

    def __init__(self, dataset: Any, columns: PreferenceColumns, options: DataOptions | None = None):
        self.dataset = dataset
        self.columns = columns
        self.options = options or DataOptions()
        self.epoch = 0
        self.num_ties = 0
        self.label_skips: list[tuple[int, str]] = []
        self._buckets: list[tuple[int, int]] | None = None
        self.rows = self._usable_rows() if columns.schema == "pickapic" else list(range(len(dataset)))
        if not self.rows:
            raise PreferenceDataError(
                f"The dataset has zero usable preference pairs ({len(dataset)} rows, {self.num_ties} ties dropped, "
                f"{len(self.label_skips)} rows with bad labels)."
            )

    def _usable_rows(self) -> list[int]:
        # Reads only the label columns, so a million-row dataset of image bytes is not decoded here.
        labels = self.dataset.select_columns(["label_0", "label_1"]).with_format(None)
        rows, ties = [], []
        for i, (l0, l1) in enumerate(zip(labels["label_0"], labels["label_1"])):
            try:
                winner = pickapic_winner(l0, l1, i)
            except BadRow as bad:
                if self.options.strict:
                    raise
                self.label_skips.append((i, bad.reason))
                continue
            (ties if winner is None else rows).append(i)
        if ties and not self.options.drop_ties:
            raise PreferenceDataError(
                f"The dataset holds {len(ties)} tied pairs (label_0 == label_1), e.g. rows {ties[:5]}: a tie has no "
                "winner to train towards. Set PolyDPOConfig.drop_ties=True to drop them."
            )
        self.num_ties = len(ties)
        if ties:
            logger.info("Dropped %d tied pairs of %d (drop_ties=True).", len(ties), len(labels))
        if self.label_skips:
            # A bad label (NaN, None, anything but a win, a loss or a tie) is a data error: said, not just counted.
            logger.warning(
                "Skipped %d of %d rows with bad labels (e.g. rows %s; labels must be (1, 0), (0, 1) or a tie). Set "
                "strict_data=True to stop at the first.",
                len(self.label_skips),
                len(labels),
                [i for i, _ in self.label_skips[:5]],
            )
        return rows

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def categories(self) -> list[str]:
        """The distinct values of the category column among usable rows."""
        if not self.columns.category:
            return []
        values = self.dataset.select_columns([self.columns.category]).with_format(None)[self.columns.category]
        return sorted({str(values[i]) for i in self.rows})

    def category_of_rows(self) -> list[str]:
        values = self.dataset.select_columns([self.columns.category]).with_format(None)[self.columns.category]
        return [str(values[i]) for i in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def bucket_of_rows(self) -> list[tuple[int, int]]:
        """Each usable row's aspect-ratio bucket, from image headers (no pixel decoding); computed once."""
        if self._buckets is None:
            buckets = list(self.options.buckets or [])
            column = self.columns.first
            sizes = [media_size(self.dataset[i][column]) for i in self.rows]
            self._buckets = [nearest_bucket(h, w, buckets) for h, w in sizes]
        return self._buckets

    def _candidates(self, index: int) -> Iterator[int]:
        """Positions tried for `index`: itself, then following rows (of the same bucket when bucketing)."""
        buckets = self.bucket_of_rows() if self.options.buckets else None
        found = 0
        for k in range(len(self.rows)):
            position = (index + k) % len(self.rows)
            if buckets is None or buckets[position] == buckets[index]:
                yield position
                found += 1
                if found == MAX_SUBSTITUTIONS:
                    return

    def __getitem__(self, index: int) -> dict[str, Any]:
        skipped = []
        for position in self._candidates(index):
            row_index = self.rows[position]
            try:
                item = load_pair(self.dataset[row_index], row_index, self.columns, self.options)
            except BadRow as bad:
                _skip_or_raise(bad, row_index, self.options, skipped)
                continue
            item["skipped"] = skipped
            return _with_augment_seed(item, self.options, self.epoch)
        raise PreferenceDataError(
            f"{len(skipped)} rows tried from row {self.rows[index]} are all unusable ({skipped[:3]}...): check the "
            "dataset."
        )


class StreamingPreferencePairs(TorchIterableDataset):
    """The streaming twin of `PreferencePairs`, over a `datasets.IterableDataset` (or any iterable of rows).

    Rows are numbered by their position in the stream (`row_index`); ties and bad rows are skipped and reported in
    the next item's `skipped` list (ties as reason `"tie"`; those after the last usable row only in a warning).
    DataLoader workers take interleaved rows, so no row is read twice.
    """

    def __init__(self, source: Any, columns: PreferenceColumns, options: DataOptions | None = None):
        self.source = source
        self.columns = columns
        self.options = options or DataOptions()
        self.epoch = 0
        self.start_row = 0  # rows before it are skipped without decoding (resuming a cache build)
        self.trailing_skipped: list[tuple[int, str]] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        skipped: list[tuple[int, str]] = []
        for row_index, row in enumerate(self.source):
            if row_index < self.start_row or row_index % workers != worker_id:
                continue
            item = decode_row(row, row_index, self.columns, self.options)
            if isinstance(item, str):
                skipped.append((row_index, item))
                continue
            item["skipped"], skipped = skipped, []
            yield _with_augment_seed(item, self.options, self.epoch)
        self.trailing_skipped = skipped  # no later item carries these; readable when iterated in this process
        if skipped:
            logger.warning("Skipped %d rows at the end of the stream: %s", len(skipped), skipped[:10])


@dataclass
class PreferenceCollator:
    """Batches decoded pairs with identical crop/flip for both items of a pair.

    Returns `pixel_values_chosen` and `pixel_values_rejected` (`[B, 3, res, res]`, or `[B, 3, F, res, res]` for
    videos, in [-1, 1]), `prompts`, `original_sizes` and `crop_top_lefts` (for SDXL's micro-conditioning),
    `row_index`, `categories` and `skipped` (bad rows passed over while fetching this batch). Prompts are encoded in
    the training step by the model's own pipeline.
    """

    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = True

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        chosen, rejected, sizes, crops = zip(*(self._transform(it) for it in items))
        shapes = {tuple(t.shape) for t in chosen}
        if len(shapes) > 1:
            raise PreferenceDataError(
                f"Rows {[it['row_index'] for it in items]} do not stack into one batch (shapes {sorted(shapes)}): "
                "videos of a batch need the same number of frames (set PolyDPOConfig.num_frames), and with "
                "aspect_ratio_buckets a batch must come from one bucket (the trainer's BucketSampler does that)."
            )
        return {
            "pixel_values_chosen": torch.stack(chosen),
            "pixel_values_rejected": torch.stack(rejected),
            "prompts": [it["prompt"] for it in items],
            "original_sizes": list(sizes),
            "crop_top_lefts": list(crops),
            "row_index": [int(it["row_index"]) for it in items],
            "categories": [it.get("category") for it in items],
            "skipped": [s for it in items for s in it.get("skipped", [])],
        }

    def _transform(self, item: dict[str, Any]):
        generator = torch.Generator().manual_seed(item["augment_seed"]) if "augment_seed" in item else None
        size = item.get("target_size") or self.resolution
        try:
            return paired_transform(
                item["chosen"], item["rejected"], size, self.center_crop, self.random_flip, generator
            )
        except ValueError as exc:
            raise PreferenceDataError(f"Row {item.get('row_index')}: {exc}.") from exc


def decode_row(row: dict[str, Any], row_index: int, columns: PreferenceColumns, options: DataOptions) -> dict | str:
    """One row of a stream decoded as training decodes it (`load_pair`), or the reason it is passed over (`"tie"`, a
    bad row's reason); raises where `options` say to stop (a tie without `drop_ties`, a bad row with `strict`)."""
    try:
        if columns.schema == "pickapic" and pickapic_winner(row["label_0"], row["label_1"], row_index) is None:
            if not options.drop_ties:
                raise PreferenceDataError(
                    f"Row {row_index} is a tie (label_0 == label_1): it has no winner to train towards. "
                    "Set PolyDPOConfig.drop_ties=True to drop ties."
                )
            return "tie"
        return load_pair(row, row_index, columns, options)
    except BadRow as bad:
        skipped: list[tuple[int, str]] = []
        _skip_or_raise(bad, row_index, options, skipped)
        return bad.reason


def _skip_or_raise(bad: BadRow, row_index: int, options: DataOptions, skipped: list[tuple[int, str]]) -> None:
    """A bad row stops the run with `strict_data`, else is logged and counted by reason."""
    if options.strict:
        raise bad
    logger.warning("Skipping a bad row: %s", bad)
    skipped.append((row_index, bad.reason))


def preference_pairs(
    dataset: Any, columns: PreferenceColumns, options: DataOptions
) -> PreferencePairs | StreamingPreferencePairs:
    """`PreferencePairs` for a map-style dataset, `StreamingPreferencePairs` for a streaming one."""
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and hasattr(dataset, "select_columns"):
        return PreferencePairs(dataset, columns, options)
    return StreamingPreferencePairs(dataset, columns, options)


def pairs_from_options(
    dataset: Any, options: DataOptions, bucket_divisibility: int
) -> PreferencePairs | StreamingPreferencePairs:
    """The pairs of `dataset` as `options` describe them: schema and columns, aspect-ratio buckets (sides multiples
    of `bucket_divisibility`, the model's), ties, strictness and frame sampling."""
    names = getattr(dataset, "column_names", None) or list(next(iter(dataset)).keys())  # a stream may declare none
    columns = options.columns_of(names)
    buckets = resolve_buckets(options.aspect_ratio_buckets, options.resolution, bucket_divisibility)
    resolved = dataclasses.replace(options, buckets=tuple(map(tuple, buckets)) if buckets else None)
    return preference_pairs(dataset, columns, resolved)


def decoded_pairs(pairs: Any, rows: Sequence[int] | None = None) -> Iterator[dict[str, Any] | str]:
    """Each pair of `pairs` (from `pairs_from_options`) once, decoded as `load_pair` decodes it, or the reason a bad
    row is skipped, without putting another row in its place (as training does); for a map-style set only `rows`
    (indices into the dataset) when given. What `diagnose` and `rescore_pairs` read."""
    if isinstance(pairs, PreferencePairs):
        for row_index in pairs.rows if rows is None else rows:
            try:
                yield load_pair(pairs.dataset[row_index], row_index, pairs.columns, pairs.options)
            except BadRow as bad:
                yield bad.reason
    else:  # a stream skips bad rows itself and reports them with the next pair
        for item in pairs:
            yield from (reason for _, reason in item.get("skipped", []))
            yield item
        yield from (reason for _, reason in pairs.trailing_skipped)  # bad rows after the last good one
