"""`report_to`: transformers' tracker callbacks on a diffusers denoiser, and validation images beside the metrics."""

from __future__ import annotations

import json
import sys
import types

from peft import LoraConfig
from PIL import Image

from vipo_trl import PolyDPOConfig, PolyDPOTrainer
from vipo_trl.eval import RewardScorer, register_scorer
from vipo_trl.testing import pickapic_dataset
from vipo_trl.trainer.trackers import log_images, log_scalars


@register_scorer("test_brightness", override=True)
class Brightness(RewardScorer):
    """The mean pixel value (0-255): checkable from the saved validation strip."""

    def _score_batch(self, images, prompts):
        import torch

        return torch.tensor([_brightness(image) for image in images])


def _brightness(image):
    import numpy as np

    return float(np.asarray(image.convert("RGB"), dtype=np.float32).mean())


def test_report_to_tensorboard_logs_the_metrics_model_config_and_validation_images_in_one_run(tmp_path, tiny_sd_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = PolyDPOConfig(
        output_dir=str(tmp_path / "out"), resolution=16, per_device_train_batch_size=2, max_steps=2, logging_steps=1,
        save_strategy="no", report_to=["tensorboard"], use_cpu=True, disable_tqdm=True,
        validation_prompts=["a red square", "a blue circle"], validation_steps=1,
        validation_scorers=["test_brightness"],
    )  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(4), peft_config=lora).train()

    runs = list((tmp_path / "out" / "runs").iterdir())
    assert len(runs) == 1, runs  # validation images in the run the metrics went to, not a second one
    events = EventAccumulator(str(runs[0]), size_guidance={"images": 0, "scalars": 0, "tensors": 0}).Reload()
    assert [s.step for s in events.Scalars("train/rewards/margins")] == [1, 2]
    assert [s.step for s in events.Scalars("train/loss")] == [1, 2]
    assert [i.step for i in events.Images("validation")] == [0, 1, 2]
    assert (events.Images("validation")[0].width, events.Images("validation")[0].height) == (32, 16)  # two images
    # The validation scores: each step's mean brightness of the images saved for that step, in the same run.
    scores = events.Scalars("validation/test_brightness")
    assert [s.step for s in scores] == [0, 1, 2]
    for scalar in scores:
        strip = Image.open(tmp_path / "out" / "validation" / f"step-{scalar.step}.png")
        halves = [strip.crop((16 * k, 0, 16 * (k + 1), 16)) for k in range(2)]
        assert abs(scalar.value - sum(map(_brightness, halves)) / 2) < 1e-3
    lines = [json.loads(line) for line in (tmp_path / "out" / "validation" / "scores.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2] and len(lines[0]["per_prompt"]["test_brightness"]) == 2
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

    wandb.calls.clear()
    trackio.calls.clear()
    log_scalars(trainer, 40, {"validation/pickscore": 21.5})
    assert wandb.calls == [({"validation/pickscore": 21.5, "train/global_step": 40}, {})] == trackio.calls

    wandb.run, trackio_cb._initialized = None, False  # no run started (not the main process): nothing logged
    log_images(trainer, 41, images, ["a", "b"])
    log_scalars(trainer, 41, {"validation/pickscore": 1.0})
    assert len(wandb.calls) == len(trackio.calls) == 1
