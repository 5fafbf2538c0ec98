"""What `report_to`'s trackers need from a diffusion trainer: a model config they can read, and images logged beside
the metrics transformers' own callbacks log."""

from __future__ import annotations

import json
from typing import Any

from diffusers.configuration_utils import FrozenDict
from torch import nn


class TrackableConfig(FrozenDict):
    """A diffusers model config (a `FrozenDict`, unchanged for diffusers) that also has the `to_dict()` and
    `to_json_string()` of a transformers config: transformers' tracker callbacks (TensorBoard, MLflow, Comet,
    Neptune, ClearML) call them on `model.config` when training starts, and a diffusers model has neither."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str) + "\n"


def make_config_trackable(network: nn.Module) -> None:
    """Give a diffusers model (`ConfigMixin`) a `TrackableConfig` with the same entries; anything else is left alone."""
    config = getattr(network, "_internal_dict", None)
    if isinstance(config, FrozenDict) and not isinstance(config, TrackableConfig):
        network._internal_dict = TrackableConfig(config)


def log_images(trainer: Any, step: int, images: list[Any], captions: list[str], tag: str = "validation") -> None:
    """Log `images` at optimizer step `step` to the trackers the run reports to, through the callbacks transformers
    made for `report_to` (so they land in the same run as the metrics): TensorBoard (one `NHWC` batch under `tag`),
    Weights & Biases (a list of captioned images) and Trackio (one captioned image per key `tag/i`). Both of the
    latter count steps themselves; like transformers' callbacks, the step goes in as `train/global_step`."""
    import numpy as np
    from transformers.integrations import TensorBoardCallback, TrackioCallback, WandbCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            batch = np.stack([np.asarray(image.convert("RGB")) for image in images])
            callback.tb_writer.add_images(tag, batch, step, dataformats="NHWC")
            callback.tb_writer.flush()
        elif isinstance(callback, WandbCallback):
            import wandb

            if wandb.run is not None:
                logged = [wandb.Image(image, caption=caption) for image, caption in zip(images, captions)]
                wandb.log({tag: logged, "train/global_step": step})
        elif isinstance(callback, TrackioCallback) and getattr(callback, "_initialized", False):
            import trackio

            logged = {f"{tag}/{i}": trackio.Image(im, caption=c) for i, (im, c) in enumerate(zip(images, captions))}
            trackio.log({**logged, "train/global_step": step})
