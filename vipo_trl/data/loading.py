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


def load_dataset_mixture(mixture: Any, seed: int = 0) -> Any:
    """The rows of several preference sets as one `DatasetDict` (`"train"`, and `"test"` with `test_split_size`),
    from TRL's dataset mixture: a `trl.DatasetMixtureConfig`, which is the `datasets:` list of a `trl dpo` YAML.

    Each entry is read as `load_preference_dataset` reads one set (hub id, `save_to_disk` folder, data file or folder
    of them; `data_files`/`data_dir` go to `datasets.load_dataset` with `path` as the builder or repo), then cut to
    its `columns`. The sets are concatenated, so they must have the same columns (and column types): a Pick-a-Pic set
    and a prompt/chosen/rejected set cannot be mixed. `fraction` works as in TRL's `get_dataset`: the shares are
    normalised, and the mixture is as large as it can be without repeating a row, each set giving its first rows.
    `test_split_size` holds out that share (or that many rows) of the mixture, drawn with `seed` so that a resumed
    run holds out the same rows."""
    from datasets import DatasetDict, IterableDatasetDict, concatenate_datasets, load_dataset

    entries = list(getattr(mixture, "datasets", None) or [])
    if not entries:
        raise PreferenceDataError("datasets: the mixture names no dataset; give each as a `- path: ...` entry")
    if any(not hasattr(entry, "path") for entry in entries):
        raise PreferenceDataError(
            "datasets: each entry is a mapping such as `- path: pickapic_v2/` (with optional name, data_dir, "
            "data_files, split, columns, fraction), written in a --config YAML file"
        )
    streaming = bool(mixture.streaming)
    fractions = [entry.fraction for entry in entries]
    if any(f is not None for f in fractions):
        if any(f is None for f in fractions):
            raise PreferenceDataError("datasets: give `fraction` for every set of the mixture or for none")
        if any(f < 0 for f in fractions) or sum(fractions) <= 0:
            raise PreferenceDataError(f"datasets: fractions must be >= 0 and not all 0, got {fractions}")
        if streaming:
            raise PreferenceDataError("datasets: `fraction` needs the sets' lengths; a streamed mixture has none")
    if streaming and mixture.test_split_size is not None:
        raise PreferenceDataError("datasets: test_split_size cannot split a streamed mixture; give a held-out set")
    parts = []
    for i, entry in enumerate(entries):
        where = f"datasets[{i}] ({entry.path})"
        if entry.data_files is not None or entry.data_dir is not None:
            part = load_dataset(
                entry.path, entry.name, data_dir=entry.data_dir, data_files=entry.data_files, split=entry.split,
                streaming=streaming,
            )  # fmt: skip
            base = entry.data_dir if entry.data_dir and os.path.isdir(entry.data_dir) else None
            part = resolve_relative_media_paths(part, os.path.abspath(base)) if base else part
        else:
            part = load_preference_dataset(entry.path, entry.name, entry.split, streaming)
        if isinstance(part, str):
            raise PreferenceDataError(
                f"{where} is a latent cache, which cannot be mixed with other sets: build one cache of the whole "
                "mixture instead (vipo-trl cache --config <this file> --cache_output DIR)"
            )
        if entry.columns is not None:
            missing = [c for c in entry.columns if c not in part.column_names]
            if missing:
                raise PreferenceDataError(f"{where}: no column(s) {missing} to keep; it has {part.column_names}")
            part = part.select_columns(entry.columns)
        columns = set(part.column_names or ())
        if parts and parts[0].column_names is not None and columns != set(parts[0].column_names):
            raise PreferenceDataError(
                f"{where} has the columns {part.column_names} and datasets[0] ({entries[0].path}) has "
                f"{parts[0].column_names}: a mixture stacks rows, so every set needs the same columns (keep the "
                "common ones with `columns:`; a Pick-a-Pic set and a prompt/chosen/rejected set cannot be mixed)"
            )
        parts.append(part)
    if fractions[0] is not None:
        weights = [f / sum(fractions) for f in fractions]
        total = min(len(part) / w for part, w in zip(parts, weights) if w > 0)
        parts = [part.select(range(min(len(part), round(w * total)))) for part, w in zip(parts, weights)]
    # Not cast here: casting a set rewrites it whole (every image of it), which is the user's call to make once.
    for i, part in enumerate(parts[1:], start=1):
        ours, theirs = getattr(part, "features", None), getattr(parts[0], "features", None)
        differ = [c for c in (theirs or {}) if ours is not None and c in ours and ours[c] != theirs[c]]
        if differ:
            column = differ[0]
            raise PreferenceDataError(
                f"datasets[{i}] ({entries[i].path}) stores column {column!r} as {_type_name(ours[column])} and "
                f"datasets[0] ({entries[0].path}) as {_type_name(theirs[column])}: a mixture stacks rows, so the "
                f"types must match; cast one set once and save it (e.g. dataset.cast_column({column!r}, ...)"
                ".save_to_disk(...)), then mix the saved copy"
            )
    rows = concatenate_datasets(parts)
    if mixture.test_split_size is None:
        return (IterableDatasetDict if streaming else DatasetDict)({"train": rows})
    return rows.train_test_split(test_size=mixture.test_split_size, seed=seed)


def _type_name(feature: Any) -> str:
    """`Value('int64')` -> "int64", `Image()` -> "Image()": how a column is stored, in a few characters."""
    dtype = getattr(feature, "dtype", None)
    return dtype if type(feature).__name__ == "Value" and dtype else f"{type(feature).__name__}()"
