"""Loading a preference dataset from what a user names: a hub id, a `save_to_disk` folder, a data file or folder of
data files, or a latent cache folder."""

from __future__ import annotations

import os
from typing import Any

from .cache import is_latent_cache
from .images import PreferenceDataError

DATA_FILE_BUILDERS = {"parquet": "parquet", "json": "json", "jsonl": "json", "csv": "csv", "arrow": "arrow"}
#: Hub datasets that papers and older guides train on but that are no longer on the Hub: a failed load says so.
WITHDRAWN_DATASETS = {
    name: "Pick-a-Pic has not been on the Hub since April 2025 (github.com/yuvalkirstain/PickScore/issues/36)"
    for name in ("yuvalkirstain/pickapic_v2", "yuvalkirstain/pickapic_v1")
}
MEDIA_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".mp4", ".webm", ".mov", ".mkv")


def load_preference_dataset(name: str, config: str | None = None, split: str = "train", streaming: bool = False) -> Any:
    """A `datasets.Dataset` (or `IterableDataset` with `streaming`) from a hub id, a `save_to_disk` folder, a
    parquet/json/jsonl/csv/arrow file or a local folder of them; a latent cache folder is returned as its path (the
    trainer reads it).

    A single file or a `save_to_disk` `Dataset` has one split: asking it for any split but `"train"` raises, since
    it would hand back the training rows under another name. Relative image or video paths in a local file are read
    relative to that file's folder (a local folder: relative to it), as `datasets`' imagefolder reads
    `metadata.jsonl`; a path found only relative to the working directory is kept as it is."""
    from datasets import load_dataset, load_from_disk

    if is_latent_cache(name):
        return name
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_info.json")):
        _check_single_split(name, split, "a `save_to_disk` Dataset")
        return load_from_disk(name)
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_dict.json")):
        return load_from_disk(name)[split]
    extension = os.path.splitext(name)[1].lstrip(".")
    if os.path.isfile(name) and extension in DATA_FILE_BUILDERS:
        _check_single_split(name, split, "one file")
        builder = DATA_FILE_BUILDERS[extension]
        dataset = load_dataset(builder, data_files={split: name}, split=split, streaming=streaming)
        return resolve_relative_media_paths(dataset, os.path.dirname(os.path.abspath(name)))
    try:
        dataset = load_dataset(name, config, split=split, streaming=streaming)
    except Exception as exc:
        if name in WITHDRAWN_DATASETS and not os.path.exists(name):
            raise FileNotFoundError(
                f"{name}: {WITHDRAWN_DATASETS[name]}. Name a local copy in its schema instead (a folder of its "
                "parquet files, or a save_to_disk folder), any prompt/chosen/rejected set, or make a set with "
                f"`vipo-trl pairs` (docs/pairs.md). ({type(exc).__name__}: {(str(exc).strip() or '-').splitlines()[0]})"
            ) from exc
        raise
    if os.path.isdir(name):
        dataset = resolve_relative_media_paths(dataset, os.path.abspath(name))
    return dataset


def _check_single_split(name: str, split: str, what: str) -> None:
    if split != "train":
        raise PreferenceDataError(
            f"{name} is {what}, so it has no {split!r} split (it would be the training rows again): put the "
            f"held-out rows in their own file and name a folder holding train.* and {split}.*, or a save_to_disk "
            "DatasetDict"
        )


def resolve_relative_media_paths(dataset: Any, base_dir: str) -> Any:
    """`dataset` with every relative image/video path that exists under `base_dir` made absolute. Only string
    values ending in a media extension are touched, and only if the first row holds one that needs it, so a set of
    image bytes is returned as it is, without a pass over it."""
    from datasets import Dataset

    try:
        first = dataset[0] if isinstance(dataset, Dataset) else next(iter(dataset))
    except (IndexError, StopIteration):
        return dataset

    def relocated(value: Any) -> Any:
        if (
            isinstance(value, str)
            and value.lower().endswith(MEDIA_EXTENSIONS)
            and not os.path.isabs(value)
            and os.path.isfile(os.path.join(base_dir, value))
        ):
            return os.path.join(base_dir, value)
        return value

    columns = [column for column, value in first.items() if relocated(value) is not value]
    if not columns:
        return dataset
    return dataset.map(lambda row: {column: relocated(row[column]) for column in columns})
