"""Loading a preference dataset from what a user names: a hub id, a `save_to_disk` folder, a data file or folder of
data files, or a latent cache folder."""

from __future__ import annotations

import os
from typing import Any

from .cache import is_latent_cache

DATA_FILE_BUILDERS = {"parquet": "parquet", "json": "json", "jsonl": "json", "csv": "csv", "arrow": "arrow"}


def load_preference_dataset(name: str, config: str | None = None, split: str = "train", streaming: bool = False) -> Any:
    """A `datasets.Dataset` (or `IterableDataset` with `streaming`) from a hub id, a `save_to_disk` folder or a
    parquet/json/jsonl/csv/arrow file; a latent cache folder is returned as its path (the trainer reads it)."""
    from datasets import load_dataset, load_from_disk

    if is_latent_cache(name):
        return name
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_info.json")):
        return load_from_disk(name)
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_dict.json")):
        return load_from_disk(name)[split]
    extension = os.path.splitext(name)[1].lstrip(".")
    if os.path.isfile(name) and extension in DATA_FILE_BUILDERS:
        builder = DATA_FILE_BUILDERS[extension]
        return load_dataset(builder, data_files={split: name}, split=split, streaming=streaming)
    return load_dataset(name, config, split=split, streaming=streaming)
