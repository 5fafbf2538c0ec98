"""`report_to`: transformers' tracker callbacks on a diffusers denoiser, and validation images beside the metrics."""

from __future__ import annotations

import contextlib
import importlib.machinery
import io
import json
import sys
import types

import pytest
from peft import LoraConfig
from PIL import Image
from safetensors.torch import load as safetensors_load

from vipo_trl import PolyDPOConfig, PolyDPOTrainer
from vipo_trl.testing import pickapic_dataset
from vipo_trl.trainer.trackers import log_images


def test_report_to_tensorboard_logs_the_metrics_model_config_and_validation_images_in_one_run(tmp_path, tiny_sd_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = PolyDPOConfig(
        output_dir=str(tmp_path / "out"), resolution=16, per_device_train_batch_size=2, max_steps=2, logging_steps=1,
        save_strategy="no", report_to=["tensorboard"], use_cpu=True, disable_tqdm=True,
        validation_prompts=["a red square"], validation_steps=1,
    )  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(4), peft_config=lora).train()

    runs = list((tmp_path / "out" / "runs").iterdir())
    assert len(runs) == 1, runs  # validation images in the run the metrics went to, not a second one
    events = EventAccumulator(str(runs[0]), size_guidance={"images": 0, "scalars": 0, "tensors": 0}).Reload()
    assert [s.step for s in events.Scalars("train/rewards/margins")] == [1, 2]
    assert [s.step for s in events.Scalars("train/loss")] == [1, 2]
    assert [i.step for i in events.Images("validation")] == [0, 1, 2]
    assert events.Images("validation")[0].width == 16
    config_text = events.Tensors("model_config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(config_text)["cross_attention_dim"] == 16  # the denoiser's own config, as JSON


class _Recorder(types.ModuleType):
    """A tracker module that records what was logged (the `wandb` / `trackio` calls `log_images` makes)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.calls: list[tuple[dict, dict]] = []
        self.run = object()

        class Image:
            def __init__(self, image, caption=None):
                self.image, self.caption = image, caption

        self.Image = Image

    def log(self, data, **kwargs):
        self.calls.append((data, kwargs))


def test_validation_images_go_to_wandb_and_trackio_at_the_trainers_global_step(monkeypatch):
    from transformers.integrations import TrackioCallback, WandbCallback

    wandb, trackio = _Recorder("wandb"), _Recorder("trackio")
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "trackio", trackio)
    wandb_cb, trackio_cb = WandbCallback.__new__(WandbCallback), TrackioCallback.__new__(TrackioCallback)
    trackio_cb._initialized = True
    trainer = types.SimpleNamespace(callback_handler=types.SimpleNamespace(callbacks=[wandb_cb, trackio_cb]))
    images = [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")]

    log_images(trainer, 40, images, ["a red square", "a blue square"])

    # Both trackers count their own steps; transformers' callbacks log the trainer's step as train/global_step, and
    # a step= that is behind the tracker's own counter would be dropped.
    ((data, kwargs),) = wandb.calls
    assert kwargs == {} and data["train/global_step"] == 40
    assert [(i.image, i.caption) for i in data["validation"]] == list(zip(images, ["a red square", "a blue square"]))
    ((data, kwargs),) = trackio.calls
    assert kwargs == {} and data["train/global_step"] == 40
    assert [data[f"validation/{i}"].caption for i in range(2)] == ["a red square", "a blue square"]

    wandb.run, trackio_cb._initialized = None, False  # no run started (not the main process): nothing logged
    log_images(trainer, 41, images, ["a", "b"])
    assert len(wandb.calls) == len(trackio.calls) == 1


def _fake_wandb(monkeypatch) -> types.ModuleType:
    """Just enough of `wandb` for transformers' `WandbCallback` to run a whole training; artifacts are recorded."""
    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # found by transformers' is_wandb_available
    wandb.artifacts = []

    class Artifact:
        def __init__(self, name, type, metadata=None):
            self.name, self.type, self.metadata, self.files = name, type, metadata, {}

        @contextlib.contextmanager
        def new_file(self, name, mode="wb"):
            buffer = io.BytesIO()
            yield buffer
            self.files[name] = buffer.getvalue()

    class Run:
        id, name, url, summary = "run-id", "run-name", "", {}

        def _label(self, **kwargs):
            pass

        def log_artifact(self, artifact, aliases=()):
            wandb.artifacts.append((artifact, list(aliases)))

    class Config(dict):
        def update(self, values, allow_val_change=False):
            super().update(values)

    def init(**kwargs):
        wandb.run = Run()
        return wandb.run

    wandb.Artifact, wandb.init, wandb.run, wandb.config, wandb.summary = Artifact, init, None, Config(), Run.summary
    wandb.log = wandb.termwarn = wandb.define_metric = wandb.finish = lambda *args, **kwargs: None
    config_util = types.ModuleType("wandb.sdk.lib.config_util")
    config_util.ConfigError = type("ConfigError", (Exception,), {})
    modules = {"wandb": wandb, "wandb.sdk": types.ModuleType("wandb.sdk"), "wandb.sdk.lib.config_util": config_util}
    modules["wandb.sdk.lib"] = types.ModuleType("wandb.sdk.lib")
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return wandb


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_wandb_final_model_artifact_holds_what_save_model_writes(tmp_path, tiny_sd_path, monkeypatch, lora):
    """WANDB_LOG_MODEL=end: the artifact is the LoRA in the pipeline's format (or the denoiser) with the run's
    config, as `save_model` writes them - not a plain Trainer's peft-keyed state dict and pickled training_args.bin."""
    from safetensors.torch import load_file

    wandb = _fake_wandb(monkeypatch)
    monkeypatch.setenv("WANDB_LOG_MODEL", "end")
    args = PolyDPOConfig(
        output_dir=str(tmp_path / "out"), resolution=16, per_device_train_batch_size=2, max_steps=2, logging_steps=1,
        save_strategy="no", report_to=["wandb"], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    peft = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]) if lora else None
    trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(4), peft_config=peft)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))

    (artifact,) = [a for a, aliases in wandb.artifacts if aliases == ["final_model"]]
    saved = {p.name: p for p in (tmp_path / "saved").iterdir()}
    assert artifact.name == "model-run-id" and set(artifact.files) == set(saved)
    weights = "pytorch_lora_weights.safetensors" if lora else "diffusion_pytorch_model.safetensors"
    uploaded = safetensors_load(artifact.files[weights])
    expected = load_file(saved[weights])
    assert uploaded.keys() == expected.keys() and all(uploaded[k].equal(expected[k]) for k in expected)
    assert artifact.metadata["final_model"] and artifact.metadata["train_loss"] == pytest.approx(0.6931, abs=2e-3)
