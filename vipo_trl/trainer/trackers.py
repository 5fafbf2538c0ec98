"""What `report_to`'s trackers need from a diffusion trainer: a model config they can read, and images logged beside
the metrics transformers' own callbacks log."""

from __future__ import annotations

import json
import numbers
import tempfile
from pathlib import Path
from typing import Any

from diffusers.configuration_utils import FrozenDict
from torch import nn
from transformers.integrations import WandbCallback


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


class FinalModelWandbCallback(WandbCallback):
    """transformers' Weights & Biases callback, except for the model it uploads when training ends
    (`WANDB_LOG_MODEL=end` or `checkpoint`): what `PolyDPOTrainer.save_model` writes (the LoRA in the pipeline's
    format, or the denoiser, with the run's config) instead of what a plain `Trainer` would save of a diffusers
    network: a state dict under peft's key names that no pipeline loads, beside a pickled `training_args.bin`."""

    def __init__(self, trainer: Any):
        super().__init__()
        self._trainer = trainer

    def on_train_end(self, args, state, control, **kwargs):
        if self._wandb is None or not self._log_model.is_enabled:
            return
        with tempfile.TemporaryDirectory() as folder:
            # Every process saves (sharded or ZeRO-3 weights are gathered together); the main one uploads.
            self._trainer.save_model(folder, _internal_call=True)
            if not (self._initialized and state.is_world_process_zero):
                return
            metadata = {k: v for k, v in dict(self._wandb.summary).items() if isinstance(v, numbers.Number)}
            metadata = {k: v for k, v in metadata.items() if not k.startswith("_")}
            if args.load_best_model_at_end:
                metadata[f"eval/{args.metric_for_best_model}"] = state.best_metric
            metadata["final_model"] = True
            run = self._wandb.run
            name = f"model-{run.id}" if args.run_name in (None, args.output_dir) else f"model-{run.name}"
            artifact = self._wandb.Artifact(name=name, type="model", metadata=metadata)
            for path in sorted(Path(folder).iterdir()):
                if path.is_file():  # read now: the folder is gone before W&B uploads in the background
                    with artifact.new_file(path.name, mode="wb") as f:
                        f.write(path.read_bytes())
            run.log_artifact(artifact, aliases=["final_model"])


def upload_saved_model_to_wandb(trainer: Any) -> None:
    """Swap transformers' `WandbCallback` in `trainer`'s callbacks (there when `report_to` names wandb) for one whose
    final-model artifact is what the trainer's own `save_model` writes. Anything else is left alone."""
    for callback in list(trainer.callback_handler.callbacks):
        if type(callback) is WandbCallback:
            trainer.remove_callback(callback)
            trainer.add_callback(FinalModelWandbCallback(trainer))
