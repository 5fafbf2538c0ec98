"""`report_to`: transformers' tracker callbacks on a diffusers denoiser, and validation images beside the metrics."""

from __future__ import annotations

import json
import sys
import types

from peft import LoraConfig
from PIL import Image

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
