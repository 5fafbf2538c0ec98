"""Data: both schemas, Pick-a-Pic orientation and ties, image forms, and errors that name row and column."""

import io
import re

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

from vipo_trl.data import (
    DataOptions,
    PreferenceCollator,
    PreferenceDataError,
    PreferencePairs,
    decode_image,
    paired_transform,
    resolve_columns,
)
from vipo_trl.testing import pickapic_dataset, png_bytes, video_dataset


def pairs(ds, **kw):
    return PreferencePairs(ds, resolve_columns(ds.column_names), DataOptions(**kw))


def is_red(image: Image.Image) -> bool:
    r, g, b = np.asarray(image, dtype=np.float32).mean(axis=(0, 1))
    return r > b


def test_pickapic_winner_is_chosen_on_either_side():
    ds = pickapic_dataset(6)
    data = pairs(ds)
    assert resolve_columns(ds.column_names).schema == "pickapic"
    assert len(data) == 6
    for i in range(6):
        item = data[i]
        assert is_red(item["chosen"]) and not is_red(item["rejected"])
        assert item["prompt"] == f"a red square {i}"
        assert item["row_index"] == i


def test_ties_dropped_and_counted_or_refused():
    ds = pickapic_dataset(4, ties=3)
    data = pairs(ds)
    assert len(data) == 4 and data.num_ties == 3
    assert [data[i]["row_index"] for i in range(4)] == [0, 1, 2, 3]
    with pytest.raises(PreferenceDataError, match=r"3 tied pairs.*rows \[4, 5, 6\].*drop_ties=True"):
        pairs(ds, drop_ties=False)


def test_only_ties_is_zero_usable_rows():
    ds = pickapic_dataset(0, ties=2)
    with pytest.raises(PreferenceDataError, match="zero usable preference pairs"):
        pairs(ds)


def test_bad_labels_are_skipped_and_counted_or_stop_when_strict():
    ds = pickapic_dataset(4).to_dict()
    ds["label_0"][1] = float("nan")
    ds["label_0"][2], ds["label_1"][2] = 0.7, 0.3  # neither win/lose nor tie
    data = pairs(Dataset.from_dict(ds))
    assert len(data) == 2 and data.label_skips == [(1, "bad_label"), (2, "bad_label")]
    with pytest.raises(PreferenceDataError, match="Row 1: label_0=nan"):
        pairs(Dataset.from_dict(ds), strict=True)


def test_missing_column_names_it_and_the_fix():
    ds = Dataset.from_dict({"prompt": ["x"], "chosen": [png_bytes((1, 2, 3))]})
    with pytest.raises(PreferenceDataError, match=r"lacks column\(s\) \['rejected'\].*rejected_column"):
        resolve_columns(ds.column_names)


def test_corrupt_image_is_skipped_and_reported_or_names_row_and_column_when_strict():
    ds = pickapic_dataset(4).to_dict()
    ds["jpg_1"][2] = b"\x89PNG\r\n\x1a\n this is not an image"
    data = pairs(Dataset.from_dict(ds))
    item = data[2]  # row 2 is bad: row 3 takes its place, and the skip is reported
    assert item["row_index"] == 3 and item["skipped"] == [(2, "undecodable")]
    assert data[1]["skipped"] == []
    strict = pairs(Dataset.from_dict(ds), strict=True)
    with pytest.raises(PreferenceDataError, match="Row 2, column 'jpg_1': cannot decode the image or video"):
        strict[2]


def test_generic_schema_with_paths_pil_and_bytes(tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(png_bytes((220, 30, 30)))
    blue = Image.open(__import__("io").BytesIO(png_bytes((30, 30, 220))))
    ds = Dataset.from_dict(
        {"prompt": ["a", "b"], "chosen": [str(path), str(path)], "rejected": [png_bytes((30, 30, 220))] * 2}
    )
    data = pairs(ds)
    assert resolve_columns(ds.column_names).schema == "generic"
    assert is_red(data[1]["chosen"]) and not is_red(data[1]["rejected"])
    assert decode_image(blue).mode == "RGB"
    assert decode_image({"bytes": None, "path": str(path)}).size == (20, 16)
    with pytest.raises(ValueError, match="no image file"):
        decode_image(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="relative paths are read from the working directory"):
        decode_image("images/missing.png")


def test_a_withdrawn_hub_dataset_says_so_and_what_to_use_instead(monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    from vipo_trl.data import load_preference_dataset

    def not_on_the_hub(name, *args, **kwargs):  # what the Hub answers for it today (no network here)
        raise DatasetNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", not_on_the_hub)
    with pytest.raises(FileNotFoundError, match=r"pickapic_v2: Pick-a-Pic has not been on the Hub since April 2025.*"
                       r"local copy.*vipo-trl pairs.*DatasetNotFoundError"):  # fmt: skip
        load_preference_dataset("yuvalkirstain/pickapic_v2")
    with pytest.raises(DatasetNotFoundError):  # any other missing dataset: the Hub's own error
        load_preference_dataset("someone/elses_set")


def test_relative_image_paths_in_a_data_file_are_read_from_its_folder(tmp_path, monkeypatch):
    import json

    from vipo_trl.data import load_preference_dataset

    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "red.png").write_bytes(png_bytes((220, 30, 30)))
    (folder / "images" / "blue.png").write_bytes(png_bytes((30, 30, 220)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "green.png").write_bytes(png_bytes((30, 220, 30)))  # relative to the working directory only
    row = {"prompt": "a red square", "chosen": "images/red.png", "rejected": "images/blue.png"}
    for name, rows in {"train.jsonl": [row, {**row, "rejected": "green.png"}], "test.jsonl": [row]}.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(elsewhere)

    for dataset in (load_preference_dataset(str(folder / "train.jsonl")), load_preference_dataset(str(folder))):
        data = pairs(dataset)
        assert is_red(data[0]["chosen"]) and not is_red(data[0]["rejected"])
        r, g, b = np.asarray(data[1]["rejected"], dtype=np.float32).mean(axis=(0, 1))
        assert g > r and g > b  # green.png, found from the working directory: kept as it is
    held_out = load_preference_dataset(str(folder), split="test")
    assert len(held_out) == 1 and is_red(pairs(held_out)[0]["chosen"])
    streamed = next(iter(load_preference_dataset(str(folder / "train.jsonl"), streaming=True)))
    assert streamed["chosen"] == str(folder / "images" / "red.png")
    # One file has one split: asked for another, it must not hand back the training rows.
    with pytest.raises(PreferenceDataError, match="no 'test' split"):
        load_preference_dataset(str(folder / "train.jsonl"), split="test")


def test_custom_column_names():
    ds = Dataset.from_dict({"text": ["p"], "good": [png_bytes((200, 0, 0))], "bad": [png_bytes((0, 0, 200))]})
    cols = resolve_columns(ds.column_names, prompt_column="text", chosen_column="good", rejected_column="bad")
    assert PreferencePairs(ds, cols)[0]["prompt"] == "p"


def test_empty_or_missing_prompt_is_a_bad_row():
    ds = Dataset.from_dict(
        {"prompt": [None, "  ", "ok"], "chosen": [png_bytes((1, 1, 1))] * 3, "rejected": [png_bytes((2, 2, 2))] * 3}
    )
    item = pairs(ds)[0]
    assert item["row_index"] == 2 and item["skipped"] == [(0, "empty_prompt"), (1, "empty_prompt")]
    with pytest.raises(PreferenceDataError, match="Row 0, column 'prompt': the prompt is empty"):
        pairs(ds, strict=True)[0]


def test_oversized_image_and_mismatched_pair_are_bad_rows():
    wide = png_bytes((200, 0, 0), size=(40, 16))
    ds = Dataset.from_dict(
        {
            "prompt": ["a", "b", "c"],
            "chosen": [png_bytes((200, 0, 0), size=(64, 64)), wide, png_bytes((200, 0, 0))],
            "rejected": [
                png_bytes((0, 0, 200), size=(64, 64)),
                png_bytes((0, 0, 200), size=(20, 20)),
                png_bytes((0, 0, 200)),
            ],
        }
    )
    item = pairs(ds, max_image_pixels=1000)[0]
    assert item["row_index"] == 2 and item["skipped"] == [(0, "too_large"), (1, "size_mismatch")]


def test_a_pair_of_identical_images_is_a_bad_row():
    red = png_bytes((200, 0, 0))
    same_pixels = Image.open(io.BytesIO(red))  # stored differently (a PIL image), the same pixels
    nearly = np.asarray(same_pixels).copy()
    nearly[0, 0, 0] ^= 1  # one bit off: a different image
    nearly_last = np.asarray(same_pixels).copy()
    nearly_last[-1, -1, 2] ^= 1  # one bit off in the last band of the last pixel
    ds = Dataset.from_dict(
        {
            "caption": ["a", "b", "c", "d"],
            "jpg_0": [red, red, red, red],
            "jpg_1": [red, png_bytes((0, 0, 200)), red, red],
            "label_0": [1.0, 0.0, 1.0, 0.0],
            "label_1": [0.0, 1.0, 0.0, 1.0],
        }
    )
    data = pairs(ds)
    assert data[0]["row_index"] == 1 and data[0]["skipped"] == [(0, "identical")]
    with pytest.raises(PreferenceDataError, match="Row 0: chosen and rejected are the same image"):
        pairs(ds, strict=True)[0]
    generic = Dataset.from_dict(
        {
            "prompt": ["a", "b", "c"],
            "chosen": [red, red, red],
            "rejected": [same_pixels, Image.fromarray(nearly), Image.fromarray(nearly_last)],
        }
    )
    assert pairs(generic)[0]["skipped"] == [(0, "identical")]
    assert pairs(generic)[2]["row_index"] == 2 and pairs(generic)[2]["skipped"] == []
    clips = video_dataset(n=2)  # a video: frame by frame
    first_copied = clips.map(
        lambda row, i: {"rejected": row["chosen"] if i == 0 else row["rejected"]}, with_indices=True
    )
    assert pairs(first_copied)[0]["skipped"] == [(0, "identical")]


def test_paired_transform_crops_and_flips_both_identically():
    gradient = np.tile(np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None], (20, 1, 3))
    chosen = Image.fromarray(gradient)
    rejected = Image.fromarray(gradient).resize((80, 40))  # another size: brought to the chosen's size first
    torch.manual_seed(0)
    flips = set()
    for _ in range(20):
        c, r, original, _ = paired_transform(chosen, rejected, 16, center_crop=False, random_flip=True)
        assert original == (20, 40)
        assert c.shape == (3, 16, 16) and c.min() >= -1 and c.max() <= 1
        torch.testing.assert_close(c, r, atol=0.05, rtol=0)
        flips.add(bool(c[0, 0, 0] > c[0, 0, -1]))
    assert flips == {True, False}


def test_collator_batches_pairs():
    data = pairs(pickapic_dataset(3))
    collate = PreferenceCollator(resolution=8)
    batch = collate([data[0], data[1]])
    assert batch["pixel_values_chosen"].shape == (2, 3, 8, 8)
    assert batch["pixel_values_rejected"].shape == (2, 3, 8, 8)
    assert batch["row_index"] == [0, 1]
    assert batch["prompts"] == ["a red square 0", "a red square 1"]
    assert batch["original_sizes"] == [(16, 20), (16, 20)] and batch["crop_top_lefts"] == [(0, 1), (0, 1)]


def test_category_balanced_sampler_evens_out_categories_and_replays_an_epoch():
    from collections import Counter

    from vipo_trl.data import CategoryBalancedSampler

    categories = ["aesthetics"] * 90 + ["portrait"] * 10
    sampler = CategoryBalancedSampler(categories, seed=3)
    counts = Counter()
    for epoch in range(20):
        sampler.set_epoch(epoch)
        counts.update(categories[i] for i in sampler)
    assert abs(counts["portrait"] / sum(counts.values()) - 0.5) < 0.05  # 10% of rows, half of the draws
    sampler.set_epoch(4)
    first = list(sampler)
    sampler.set_epoch(4)
    assert list(sampler) == first and len(first) == 100


def _generic_set(tag: str, n: int) -> Dataset:
    return Dataset.from_dict(
        {"prompt": [f"{tag} {i}" for i in range(n)], "chosen": [png_bytes((200, 0, 0))] * n,
         "rejected": [png_bytes((0, 0, 200))] * n, "extra": [i for i in range(n)]}
    )  # fmt: skip


def _mixture(*entries: dict, **settings):
    from trl import DatasetMixtureConfig

    return DatasetMixtureConfig(datasets=[dict(e) for e in entries], **settings)


def test_a_mixture_stacks_the_sets_and_takes_trls_fractions(tmp_path):
    from vipo_trl.data import load_dataset_mixture

    _generic_set("a", 8).to_parquet(str(tmp_path / "a.parquet"))
    _generic_set("b", 8).save_to_disk(str(tmp_path / "b"))
    a, b = {"path": str(tmp_path / "a.parquet")}, {"path": str(tmp_path / "b")}

    whole = load_dataset_mixture(_mixture(a, b))
    assert list(whole) == ["train"] and list(whole["train"]["prompt"]) == [f"a {i}" for i in range(8)] + [
        f"b {i}" for i in range(8)
    ]
    # Shares 1:3 of two 8-row sets: the largest mixture without repeats is 8 / 0.75 = 10.67 rows, so
    # round(0.25 * 10.67) = 3 rows of a and round(0.75 * 10.67) = 8 of b, each set's first rows.
    shared = load_dataset_mixture(_mixture({**a, "fraction": 1}, {**b, "fraction": 3}))["train"]
    assert list(shared["prompt"]) == ["a 0", "a 1", "a 2"] + [f"b {i}" for i in range(8)]
    # `columns` keeps those; a held-out share drawn with the seed: the same rows each time, none in both splits
    columns = ["prompt", "chosen", "rejected"]
    kept = _mixture({**a, "columns": columns}, {**b, "columns": columns}, test_split_size=0.25)
    split = load_dataset_mixture(kept, seed=3)
    assert split["train"].column_names == ["prompt", "chosen", "rejected"] and split["test"].num_rows == 4
    assert sorted(list(split["train"]["prompt"]) + list(split["test"]["prompt"])) == sorted(
        list(whole["train"]["prompt"])
    )
    assert list(load_dataset_mixture(kept, seed=3)["test"]["prompt"]) == list(split["test"]["prompt"])


def test_a_mixture_that_cannot_be_stacked_is_refused_naming_the_set(tmp_path):
    from vipo_trl.data import load_dataset_mixture

    _generic_set("a", 4).to_parquet(str(tmp_path / "a.parquet"))
    pickapic_dataset(4).save_to_disk(str(tmp_path / "pickapic"))
    a = {"path": str(tmp_path / "a.parquet")}
    cases = [
        (_mixture(a, {"path": str(tmp_path / "pickapic")}), "datasets[1] (" + str(tmp_path / "pickapic")),
        (_mixture(a, {**a, "columns": ["prompt", "chosen", "rejected"]}), "same columns"),
        (_mixture({**a, "columns": ["prompt", "image"]}), "no column(s) ['image']"),
        (_mixture({**a, "fraction": 1}, a), "every set of the mixture or for none"),
        (_mixture(), "names no dataset"),
    ]
    for mixture, message in cases:
        with pytest.raises(PreferenceDataError, match=re.escape(message)):
            load_dataset_mixture(mixture)


def test_a_mixture_of_the_same_columns_stored_differently_names_the_column_and_both_types(tmp_path):
    """Integer labels beside float ones, or `Image()` columns beside image bytes, cannot be stacked as they are; the
    mixture is not cast behind the user's back (a cast rewrites a set whole), the error says which column and how."""
    from datasets import Image as ImageFeature
    from datasets import Value

    from vipo_trl.data import load_dataset_mixture

    pickapic_dataset(4).to_parquet(str(tmp_path / "a.parquet"))
    as_ints = pickapic_dataset(4).cast_column("label_0", Value("int64"))
    as_ints.save_to_disk(str(tmp_path / "ints"))
    as_images = pickapic_dataset(4).cast_column("jpg_1", ImageFeature())
    as_images.save_to_disk(str(tmp_path / "images"))
    a = {"path": str(tmp_path / "a.parquet")}
    cases = [("ints", "label_0", "int64", "float64"), ("images", "jpg_1", "Image()", "binary")]
    for name, column, ours, theirs in cases:
        message = f"stores column {column!r} as {ours} and datasets[0] ({a['path']}) as {theirs}"
        with pytest.raises(PreferenceDataError, match=re.escape(message)):
            load_dataset_mixture(_mixture(a, {"path": str(tmp_path / name)}))
