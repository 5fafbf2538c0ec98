"""Test fixtures: tiny components of the real classes (see `vipo_trl.testing`), saved and loaded through the same path
a hub id takes."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from vipo_trl.testing import (  # noqa: E402,F401  (re-exported for the test modules)
    pickapic_dataset,
    png_bytes,
    save_tiny_sd,
    tiny_clip_tokenizer,
    tiny_sd_components,
)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The command line's embedded run sets torch's thread count for its process; in-process tests must not leak it
    into the tests after them."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> str:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd_v_path(tmp_path_factory) -> str:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd-v"), prediction_type="v_prediction")
