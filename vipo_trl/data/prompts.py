"""Prompt sets for generation (evaluation, making pairs): built-in categories, text and JSON files, a dataset's
column."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .loading import load_preference_dataset

#: Built-in prompts in balanced categories, for a first pair set from a real text-to-image model.
BUILTIN_CATEGORIES: dict[str, list[str]] = {
    "objects": [
        "a photo of a red apple on a wooden table",
        "a bowl of ramen, studio photograph",
        "a cup of coffee next to an open book",
        "a vintage camera on a shelf",
    ],
    "counting": [
        "two cats sleeping on a blue sofa",
        "three blue balloons above a white house",
        "four oranges in a glass bowl",
        "five birds on a power line",
    ],
    "spatial": [
        "a green bicycle to the left of a yellow door",
        "a dog under a wooden table",
        "a red cube on top of a blue sphere",
        "a lamp to the right of a bed",
    ],
    "styles": [
        "a lighthouse on a cliff at sunset, oil painting",
        "a watercolor painting of a fox in the snow",
        "a futuristic city skyline at night, cyberpunk",
        "a portrait of an old fisherman, dramatic lighting",
    ],
    "text": [
        "a sign that says 'OPEN' in neon letters",
        "a coffee mug with the word 'hello' printed on it",
        "a book cover titled 'The Sea'",
        "a street sign that reads 'Main St'",
    ],
    "scenes": [
        "a mountain lake reflecting pine trees at dawn",
        "a cozy library with a fireplace",
        "a busy market street in the rain",
        "an astronaut riding a horse on the moon",
    ],
}


#: The prompt columns looked for when none is named: Pick-a-Pic v2's, then the generic schema's.
PROMPT_COLUMNS = ("caption", "prompt")


def load_prompt_set(
    source: str | os.PathLike | Sequence[str] | Sequence[tuple[str, str | None]] | None,
    column: str | None = None,
    category_column: str | None = None,
    limit: int | None = None,
) -> list[tuple[str, str | None]]:
    """(prompt, category) pairs from: `"builtin"` or `None` (`BUILTIN_CATEGORIES`); a `.txt` file, one prompt per
    line, optionally `category<TAB>prompt`; a `.json` list of prompts; a dataset file or folder (`column`, by
    default Pick-a-Pic's `caption` or the generic schema's `prompt`, and `category_column` if given); or a list of
    prompts or (prompt, category) tuples."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if source is None or source == "builtin":
        items = [(p, c) for c, prompts in BUILTIN_CATEGORIES.items() for p in prompts]
    elif not isinstance(source, str):
        items = [(s, None) if isinstance(s, str) else (str(s[0]), s[1]) for s in source]
    elif source.endswith(".json"):
        items = [(str(p), None) for p in json.loads(Path(source).read_text())]
    elif source.endswith(".txt"):
        items = []
        for line in Path(source).read_text().splitlines():
            if line.strip():
                category, tab, prompt = line.partition("\t")
                items.append((prompt.strip(), category.strip()) if tab else (line.strip(), None))
    else:
        dataset = load_preference_dataset(source)
        if column is None:
            found = [name for name in PROMPT_COLUMNS if name in dataset.column_names]
            column = found[0] if found else PROMPT_COLUMNS[0]
        for name in (column, category_column):
            if name is not None and name not in dataset.column_names:
                flag = "--prompt_column" if name == column else "--category_column"
                raise ValueError(f"{source} has no column {name!r} (columns: {dataset.column_names}); set {flag}.")
        categories = dataset[category_column] if category_column else [None] * len(dataset)
        items = list(dict.fromkeys(zip(dataset[column], categories)))  # unique, in order
    if not items:
        raise ValueError(f"no prompts found in {source}.")
    return items[:limit] if limit else items
