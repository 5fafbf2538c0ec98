"""The first code a user copies runs as written: the README's and the docs' quickstarts, with only the model, the data
and the sizes swapped for tiny ones (each swap must find its text, so a rewritten snippet fails here until this test
is updated with it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vipo_trl.testing import pickapic_dataset

ROOT = Path(__file__).resolve().parents[1]
HUB_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
#: What makes a real-size run a tiny one; everything else in a snippet runs as written.
TINY = {
    "resolution=512": "resolution=16",
    "max_steps=2000": "max_steps=2",
    "per_device_train_batch_size=4": "per_device_train_batch_size=2",
    "gradient_accumulation_steps=8": "gradient_accumulation_steps=1",
    "bf16=True": "bf16=True, use_cpu=True",  # bf16 on the CPU, where transformers asks for use_cpu
}


def python_blocks(doc: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / doc).read_text(), flags=re.S | re.M)


def made_tiny(code: str, model: str, swaps: dict[str, str]) -> str:
    """`code` with the tiny model and `swaps` (a training snippet: `TINY` too, lest it run at full size)."""
    for old, new in {HUB_MODEL: model, **swaps}.items():
        assert old in code, f"the snippet no longer contains {old!r}: update this test with the new snippet"
        code = code.replace(old, new)
    return code


def run(code: str) -> dict:
    namespace: dict = {"__name__": "snippet"}
    exec(compile(code, "<snippet>", "exec"), namespace)
    return namespace


@pytest.fixture
def pickapic_copy(tmp_path, monkeypatch):
    """A user's copy of Pick-a-Pic v2 (`pickapic_v2/train-*.parquet`, its own schema) in the working directory."""
    (tmp_path / "pickapic_v2").mkdir()
    pickapic_dataset(6).to_parquet(str(tmp_path / "pickapic_v2" / "train-00000-of-00001.parquet"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def check_trained_and_loaded(tmp_path, namespace):
    lora = tmp_path / "sd15-polydpo" / "pytorch_lora_weights.safetensors"
    assert lora.is_file() and namespace["trainer"].state.global_step == 2
    pipe = namespace["pipe"]
    assert any("lora_" in name for name, _ in pipe.unet.named_parameters())


@pytest.mark.parametrize("doc", ["README.md", "docs/quickstart.md"])
def test_the_quickstart_trains_saves_and_loads_into_the_pipeline(doc, tiny_sd_path, pickapic_copy):
    train, load = python_blocks(doc)[:2]
    push = {"trainer.push_to_hub()": "pass"} if "trainer.push_to_hub()" in train else {}  # no Hub to reach here
    generate = '"a photo of a corgi wearing a crown")'
    small = {generate: generate[:-1] + ", num_inference_steps=2, height=16, width=16)"} if generate in load else {}
    namespace = run(made_tiny(train, tiny_sd_path, {**TINY, **push}))
    namespace.update(run(made_tiny(load, tiny_sd_path, small)))
    check_trained_and_loaded(pickapic_copy, namespace)
    if small:
        assert namespace["image"].size == (16, 16)
    predict = [block for block in python_blocks(doc) if "trainer.predict(held_out)" in block]
    if doc == "docs/quickstart.md":  # its held-out pairs snippet, on the trained trainer
        (block,) = predict
        namespace = {**namespace, "held_out": pickapic_dataset(3, ties=1)}
        exec(compile(block, "<snippet>", "exec"), namespace)
        assert namespace["out"].predictions.shape == (3, 2) and namespace["out"].label_ids.tolist() == [0, 1, 2]


def test_the_docs_front_page_snippet_trains(tiny_sd_path, pickapic_copy):
    (train,) = python_blocks("docs/index.md")
    namespace = run(made_tiny(train, tiny_sd_path, TINY))
    load = 'pipe.load_lora_weights("sd15-polydpo")'  # what the snippet's last comment says to do
    assert load in train
    pipeline = f"StableDiffusionPipeline.from_pretrained({tiny_sd_path!r})"
    namespace.update(run(f"from diffusers import StableDiffusionPipeline\npipe = {pipeline}\n{load}"))
    check_trained_and_loaded(pickapic_copy, namespace)
