"""Configuration of `PolyDPOTrainer`."""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Literal

from transformers import TrainingArguments

from ..data.preference import DataOptions
from ..losses import BUILTIN_LOSSES, LOSS_CONFIG_FIELDS, get_loss
from ..models.options import LOSS_WEIGHTINGS, TIMESTEP_SAMPLINGS, DiffusionOptions

_SCHEMAS = ("auto", "pickapic", "generic")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class PolyDPOConfig(TrainingArguments):
    r"""
    Configuration class for [`PolyDPOTrainer`].

    It holds every argument of `transformers.TrainingArguments` (logging, checkpoints, `report_to`, `push_to_hub`,
    mixed precision, `optim="adamw_bnb_8bit"`, multi-GPU through accelerate) plus the ones below.

    Parameters:
        > Parameters that control the loss

        loss_type (`str` or `list[str]`, *optional*, defaults to `"poly_dpo"`):
            Name(s) of the loss(es) to use, from `vipo_trl.losses.available_losses()`: `"poly_dpo"` (ViPO),
            `"diffusion_dpo"` (alias `"dpo"`), `"robust"`, `"hinge"`, `"ipo"`, `"mapo"`, `"kto"`, `"sft"`, or any
            loss registered with `vipo_trl.losses.register_loss`. Several losses are summed, weighted by
            `loss_weights`, as in TRL: `loss_type=["poly_dpo", "sft"]`. A loss's own setting below changed from its
            default while no selected loss reads it (`poly_alpha` with `"diffusion_dpo"`) is warned about.
        loss_weights (`list[float]` or `None`, *optional*, defaults to `None`):
            One weight per entry of `loss_type`; `None` weighs each loss 1.0.
        loss_params (`dict[str, dict]`, `str` or `None`, *optional*, defaults to `None`):
            Parameters of losses that declare their own (`register_loss(..., params=...)`), by loss name:
            `{"my_loss": {"margin": 2.0}}`, or that as a JSON string on the command line. Every name must be in
            `loss_type` and every key a field of that loss's parameter dataclass.
        beta (`float` or `None`, *optional*, defaults to `None`):
            Strength of the implicit KL constraint to the reference model, in the convention
            `logits = -0.5 * beta * ((e_w - e_l) - (e_ref_w - e_ref_l))` used by every loss of the library and every
            model family. `None` takes the family's recommended value (2000 for SD 1.x/2.x, 5000 for SDXL, 100 for
            SD3, FLUX and Wan; see docs/model_families.md for the sources). diffusers' SD1.5 LoRA example's
            `beta_dpo=2500` is 5000 here. Must be > 0.
        poly_alpha (`float`, *optional*, defaults to `0.0`):
            Poly-DPO's alpha in `loss = -log(p) + alpha * (1 - p)`. `0` is exactly Diffusion-DPO; `> 0` for noisy,
            conflicting preference data such as Pick-a-Pic v2; `< 0` for over-simple data. Must be >= -1: below,
            the gradient factor `-(1 - p)(1 + alpha * p)` changes sign for confident pairs and training would push
            them the wrong way.
        label_smoothing (`float`, *optional*, defaults to `0.0`):
            As in TRL, the rate at which preference labels are assumed flipped, read by `"robust"` (robust DPO, for
            noisy preferences; the paper suggests 0.1). The other built-in losses do not read it (a warning says so;
            TRL's `sigmoid` no longer does either). Must be in [0, 0.5).
        mapo_beta (`float`, *optional*, defaults to `0.1`):
            MaPO's weight of the margin (odds-ratio) term, as in the authors' code.
        mapo_snr (`float`, *optional*, defaults to `0.5`):
            MaPO's constant `s` in the score `s*e / (exp(s*e) - 1)`.
        mapo_margin_scale (`float`, *optional*, defaults to `1000.0`):
            MaPO multiplies the log-odds by the scheduler's number of training timesteps (1000).
        kto_desirable_weight (`float`, *optional*, defaults to `1.0`):
            Diffusion-KTO's weight of desirable (chosen) samples, `lambda_d`.
        kto_undesirable_weight (`float`, *optional*, defaults to `1.0`):
            Diffusion-KTO's weight of undesirable (rejected) samples, `lambda_u`.

        > Parameters that control the data

        dataset_schema (`str`, *optional*, defaults to `"auto"`):
            `"pickapic"` (Pick-a-Pic v2: `caption`, `jpg_0`, `jpg_1`, `label_0`, `label_1`), `"generic"`
            (`prompt`, `chosen`, `rejected`) or `"auto"` to tell them apart by their columns.
        prompt_column (`str` or `None`, *optional*, defaults to `None`):
            Column of the prompt; `None` means `"caption"` for Pick-a-Pic and `"prompt"` for the generic schema.
        chosen_column (`str`, *optional*, defaults to `"chosen"`):
            Column of the preferred image in the generic schema.
        rejected_column (`str`, *optional*, defaults to `"rejected"`):
            Column of the dispreferred image in the generic schema.
        category_column (`str` or `None`, *optional*, defaults to `None`):
            Optional column naming each pair's category (ViPO: aesthetics, composition, text-image alignment, text
            rendering, portrait; motion quality, visual quality, video-text alignment). Per-category loss, accuracy
            and margin are logged as `category/<name>/...`.
        category_balanced (`bool`, *optional*, defaults to `False`):
            Sample categories uniformly (then rows uniformly within a category), so rare categories are not drowned.
            Needs `category_column` and a map-style dataset.
        strict_data (`bool`, *optional*, defaults to `False`):
            What to do with a row that cannot be trained on (bad label, empty prompt, undecodable or oversized image
            or video, mismatched pair). `False`: skip it, count it per reason (`data/skipped/<reason>` in the logs and
            a summary at the end of each epoch). `True`: stop with the row index and the reason.
        max_image_pixels (`int` or `None`, *optional*, defaults to `89478485`):
            Images (or video frames) with more pixels are refused before decoding (decompression bombs).
        num_frames (`int` or `None`, *optional*, defaults to `None`):
            Frames per video (Wan2.1 wants 4k + 1, e.g. 81). `None` keeps every frame, which then must match
            within a batch.
        video_fps (`float` or `None`, *optional*, defaults to `None`):
            Frame rate videos are resampled to before taking `num_frames` frames (Wan2.1 was trained at 16 fps).
            `None` keeps the file's own rate.
        cache_dtype (`str`, *optional*, defaults to `"float32"`):
            Dtype of the tensors a latent cache stores (`vipo_trl.build_latent_cache`). `"float32"` keeps the
            cache exact; `"bfloat16"` or `"float16"` halve its size.
        drop_ties (`bool`, *optional*, defaults to `True`):
            Drop Pick-a-Pic pairs whose labels tie (about 12% of Pick-a-Pic v2), logging how many. With `False`, a
            dataset holding ties is refused: a tie has no winner to train towards.
        resolution (`int`, *optional*, defaults to `512`):
            Images are resized so their shorter side is `resolution`, then cropped to `resolution x resolution`.
            Keep it near the size the model was built for (512 for SD 1.5, 1024 for SDXL and SD3): the trainer warns
            when it is under half or over twice that size.
        aspect_ratio_buckets (`str` or `None`, *optional*, defaults to `None`):
            `None` crops every pair to `resolution x resolution`. `"auto"` groups pairs into aspect-ratio buckets of
            about `resolution**2` pixels (`diffusers.training_utils.generate_aspect_ratio_buckets`, sides multiples of
            what the model needs: 64 for SD/SDXL, 16 for SD3/FLUX/Wan); `"1024,1024;1152,896;896,1152"` lists them
            as `height,width`. Both images of a pair go to the bucket nearest the chosen image's aspect ratio, and
            every batch comes from one bucket, so non-square images are not distorted. Needs a map-style dataset
            or a latent cache built with the same setting.
        center_crop (`bool`, *optional*, defaults to `True`):
            Crop at the centre; `False` crops at a random position (the same for both images of a pair).
        random_flip (`bool`, *optional*, defaults to `True`):
            Flip both images of a pair horizontally together with probability 0.5.
        proportion_empty_prompts (`float`, *optional*, defaults to `0.0`):
            Share of training pairs whose prompt is replaced by no prompt, for both images of the pair and the
            reference alike, as diffusers' training scripts do: the model keeps learning the unconditional prediction
            that classifier-free guidance steers from. "No prompt" is what the pipeline's guidance uses: the encoded
            empty prompt, or zeros for SDXL (`force_zeros_for_empty_prompt`). Drawn per pair from `seed`, the step
            and the row (a resumed run draws the same); never in evaluation. Works from a latent cache too.

        > Parameters that control validation images

        validation_prompts (`list[str]` or `None`, *optional*, defaults to `None`):
            Prompts to sample with the model being trained at the start, every `validation_steps` steps and at the
            end (one image each, seed `seed`), as diffusers' training scripts do: saved to
            `output_dir/validation/step-N.png` and logged to TensorBoard, Weights & Biases or Trackio when in
            `report_to`.
            Needs the raw dataset (a latent-cache run loads no VAE or text encoder).
        validation_steps (`int`, *optional*, defaults to `200`):
            Optimizer steps between validation images.

        > Parameters that control the diffusion process

        timestep_sampling (`str` or `None`, *optional*, defaults to `None`):
            Density of training timesteps: `"uniform"`, `"logit_normal"` or `"mode"` (SD3 paper). `None` takes the
            family's default: uniform for SD 1.x/2.x and SDXL (as Diffusion-DPO), logit-normal for SD3, FLUX and Wan
            (as diffusers' flow-matching training scripts). Chosen and rejected of a pair always share timestep and
            noise.
        logit_mean (`float`, *optional*, defaults to `0.0`):
            Mean of the logit-normal timestep density.
        logit_std (`float`, *optional*, defaults to `1.0`):
            Standard deviation of the logit-normal timestep density.
        mode_scale (`float`, *optional*, defaults to `1.29`):
            Scale of the `"mode"` timestep density.
        loss_weighting (`str`, *optional*, defaults to `"none"`):
            Per-sample weighting of the squared error for flow-matching families: `"none"`, `"sigma_sqrt"` or
            `"cosmap"` (`diffusers.training_utils.compute_loss_weighting_for_sd3`). Applied to policy and reference
            errors alike.
        guidance_scale (`float`, *optional*, defaults to `3.5`):
            Guidance value fed to guidance-distilled transformers (FLUX.1-dev) during training.
        drop_t5_text_encoder (`bool`, *optional*, defaults to `False`):
            SD3: do not load the T5-XXL text encoder; its embeddings are zeros, as in `StableDiffusion3Pipeline` with
            `text_encoder_3=None`. Saves about 9 GB at a small cost in prompt following.
        flow_shift (`float` or `None`, *optional*, defaults to `None`):
            Shift of the flow-matching training schedule; `None` uses the checkpoint's scheduler config.
        max_sequence_length (`int` or `None`, *optional*, defaults to `None`):
            Token length of the T5/UMT5 prompt sequence (SD3, FLUX, Wan); `None` uses the pipeline's default (256
            for SD3, 512 for FLUX, 226 for Wan). Shorter is faster when prompts are short.

        > Parameters that control the model

        revision (`str` or `None`, *optional*, defaults to `None`):
            Revision (branch, tag or commit) of the model on the Hub.
        variant (`str` or `None`, *optional*, defaults to `None`):
            Variant of the weight files to load, e.g. `"fp16"`.
        torch_dtype (`str` or `None`, *optional*, defaults to `None`):
            Dtype of the frozen weights: VAE, text encoder, the reference copy, and the base weights under LoRA.
            `None` follows mixed precision (`bfloat16` with `bf16=True`, `float16` with `fp16=True`, else
            `float32`). Trainable weights are always kept in float32. Under `float16` the VAE runs in float32
            instead, since the SD VAEs overflow in float16.
        gradient_checkpointing / activation_checkpointing (`bool`, *optional*, defaults to `False`):
            Recompute the denoiser's activations in the backward pass to save memory (inherited field).
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            The command line refuses an `output_dir` that holds an earlier run (its weights, config or
            checkpoints) unless this is set or the run resumes (`--resume_from_checkpoint`).
        max_nonfinite_steps (`int`, *optional*, defaults to `10`):
            An optimizer step whose loss or gradient is NaN/inf is skipped (on every process), counted and logged
            (`nonfinite/skipped_steps`); beyond this many, training stops with the step, the rows and the last finite
            values. `0` stops at the first.
        max_grad_norm (`float`, *optional*, defaults to `1.0`):
            Gradient clipping (inherited field).
    """

    # Loss
    loss_type: list[str] = field(default_factory=lambda: ["poly_dpo"])
    loss_weights: list[float] | None = None
    loss_params: dict | str | None = None
    beta: float | None = None
    poly_alpha: float = 0.0
    label_smoothing: float = 0.0
    mapo_beta: float = 0.1
    mapo_snr: float = 0.5
    mapo_margin_scale: float = 1000.0
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0

    # Data
    dataset_schema: Literal["auto", "pickapic", "generic"] = "auto"
    prompt_column: str | None = None
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    category_column: str | None = None
    category_balanced: bool = False
    strict_data: bool = False
    max_image_pixels: int | None = 89_478_485
    num_frames: int | None = None
    video_fps: float | None = None
    cache_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    drop_ties: bool = True
    resolution: int = 512
    aspect_ratio_buckets: str | None = None
    center_crop: bool = True
    random_flip: bool = True
    proportion_empty_prompts: float = 0.0

    # Validation
    validation_prompts: list[str] | None = None
    validation_steps: int = 200

    # Diffusion
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    guidance_scale: float = 3.5
    drop_t5_text_encoder: bool = False
    flow_shift: float | None = None
    max_sequence_length: int | None = None

    # Model loading
    revision: str | None = None
    variant: str | None = None
    torch_dtype: Literal["float32", "bfloat16", "float16"] | None = None

    overwrite_output_dir: bool = False
    max_nonfinite_steps: int = 10

    # Defaults that differ from TrainingArguments
    learning_rate: float = field(default=1e-5, metadata={"help": "Initial learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the preference collator reads the raw columns."}
    )

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.loss_type = list(self.loss_type)
        if not self.loss_type:
            raise ValueError("`loss_type` is empty: name at least one loss, e.g. loss_type='poly_dpo'.")
        for name in self.loss_type:
            get_loss(name)  # raises with the list of available losses
        if self.loss_weights is None:
            self.loss_weights = [1.0] * len(self.loss_type)
        self.loss_weights = [float(w) for w in self.loss_weights]
        if len(self.loss_weights) != len(self.loss_type):
            raise ValueError(
                f"`loss_weights` has {len(self.loss_weights)} entries but `loss_type` has {len(self.loss_type)} "
                f"({self.loss_type}); give one weight per loss."
            )
        for w in self.loss_weights:
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"`loss_weights` must be finite and >= 0, got {self.loss_weights}.")
        if isinstance(self.loss_params, str):
            try:
                self.loss_params = json.loads(self.loss_params)
            except json.JSONDecodeError as exc:
                raise ValueError(f"PolyDPOConfig.loss_params is not JSON ({exc}): {self.loss_params!r}.") from None
        for name, params in (self.loss_params or {}).items():
            if name not in self.loss_type:
                raise ValueError(
                    f"PolyDPOConfig.loss_params names {name!r}, which is not in loss_type {self.loss_type}: add it "
                    "there or remove its parameters."
                )
            get_loss(name).resolve_params({name: params})  # raises naming an unknown parameter

        _require(
            self.beta is None or (self.beta > 0 and math.isfinite(self.beta)),
            "beta",
            self.beta,
            "must be None (the model family's default) or a finite number > 0",
        )
        _require(
            math.isfinite(self.poly_alpha) and self.poly_alpha >= -1,
            "poly_alpha",
            self.poly_alpha,
            "must be >= -1 (below, Poly-DPO's gradient changes sign for confident pairs)",
        )
        _require(0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing, "must be in [0, 0.5)")
        _require(self.mapo_beta >= 0, "mapo_beta", self.mapo_beta, "must be >= 0")
        _require(self.mapo_snr > 0, "mapo_snr", self.mapo_snr, "must be > 0")
        _require(self.mapo_margin_scale > 0, "mapo_margin_scale", self.mapo_margin_scale, "must be > 0")
        _require(self.kto_desirable_weight >= 0, "kto_desirable_weight", self.kto_desirable_weight, "must be >= 0")
        _require(
            self.kto_undesirable_weight >= 0, "kto_undesirable_weight", self.kto_undesirable_weight, "must be >= 0"
        )
        self._warn_about_unread_loss_settings()
        _require(self.dataset_schema in _SCHEMAS, "dataset_schema", self.dataset_schema, f"must be one of {_SCHEMAS}")
        _require(
            not self.category_balanced or self.category_column is not None,
            "category_balanced",
            self.category_balanced,
            "needs category_column to be set",
        )
        _require(
            not (self.category_balanced and self.aspect_ratio_buckets),
            "category_balanced",
            self.category_balanced,
            "cannot be combined with aspect_ratio_buckets (each decides the sampling order); choose one",
        )
        _require(self.num_frames is None or self.num_frames > 0, "num_frames", self.num_frames, "must be None or > 0")
        _require(self.video_fps is None or self.video_fps > 0, "video_fps", self.video_fps, "must be None or > 0")
        _require(
            self.max_image_pixels is None or self.max_image_pixels > 0,
            "max_image_pixels",
            self.max_image_pixels,
            "must be None or > 0",
        )
        _require(self.cache_dtype in _DTYPES, "cache_dtype", self.cache_dtype, f"must be one of {_DTYPES}")
        _require(
            0 <= self.proportion_empty_prompts < 1,
            "proportion_empty_prompts",
            self.proportion_empty_prompts,
            "must be in [0, 1): the share of pairs trained without their prompt (e.g. 0.1)",
        )
        _require(self.validation_steps >= 1, "validation_steps", self.validation_steps, "must be >= 1")
        _require(self.max_nonfinite_steps >= 0, "max_nonfinite_steps", self.max_nonfinite_steps, "must be >= 0")
        _require(
            math.isfinite(self.learning_rate) and self.learning_rate > 0,
            "learning_rate",
            self.learning_rate,
            "must be > 0 (at 0 training would save an unchanged model)",
        )
        _require(
            self.per_device_train_batch_size >= 1,
            "per_device_train_batch_size",
            self.per_device_train_batch_size,
            "must be >= 1 (pairs per device per step)",
        )
        _require(self.resolution >= 8, "resolution", self.resolution, "must be an int >= 8")
        _require(
            self.timestep_sampling is None or self.timestep_sampling in TIMESTEP_SAMPLINGS,
            "timestep_sampling",
            self.timestep_sampling,
            f"must be None or one of {TIMESTEP_SAMPLINGS}",
        )
        _require(self.logit_std > 0, "logit_std", self.logit_std, "must be > 0")
        _require(
            self.loss_weighting in LOSS_WEIGHTINGS,
            "loss_weighting",
            self.loss_weighting,
            f"must be one of {LOSS_WEIGHTINGS}",
        )
        _require(
            self.max_sequence_length is None or self.max_sequence_length > 0,
            "max_sequence_length",
            self.max_sequence_length,
            "must be None or > 0",
        )
        _require(self.flow_shift is None or self.flow_shift > 0, "flow_shift", self.flow_shift, "must be None or > 0")
        _require(
            self.torch_dtype is None or self.torch_dtype in _DTYPES,
            "torch_dtype",
            self.torch_dtype,
            f"must be None or one of {_DTYPES}",
        )
        # TrainingArguments fields that act on a language model (noise on its token embeddings, Liger's fused kernels
        # for its layers): a diffusion denoiser has neither, and transformers would fail at the first step.
        _require(
            not self.neftune_noise_alpha,
            "neftune_noise_alpha",
            self.neftune_noise_alpha,
            "adds noise to a language model's token embeddings, which a diffusion denoiser does not have: leave it "
            "unset",
        )
        _require(
            not self.use_liger_kernel,
            "use_liger_kernel",
            self.use_liger_kernel,
            "patches a language model's layers with Liger kernels, which a diffusion denoiser does not have: leave it "
            "False",
        )
        # The collator needs the raw image and prompt columns, which Trainer would otherwise drop.
        self.remove_unused_columns = False
        super().__post_init__()

    def _warn_about_unread_loss_settings(self) -> None:
        """A loss setting changed from its default that none of the selected losses reads (`poly_alpha` with
        `loss_type="diffusion_dpo"`, `label_smoothing` without `robust`) is warned about, as TRL warns for its losses
        that ignore `label_smoothing`. Not when a loss of the user's own is selected: it may read any field."""
        if not set(self.loss_type) <= BUILTIN_LOSSES:
            return
        read = {name for loss in self.loss_type for name in LOSS_CONFIG_FIELDS.get(loss, ())}
        defaults = {f.name: f.default for f in fields(self)}
        unread = [
            name
            for fields_of_loss in LOSS_CONFIG_FIELDS.values()
            for name in fields_of_loss
            if name not in read and getattr(self, name) != defaults[name]
        ]
        for name in dict.fromkeys(unread):
            readers = sorted(loss for loss, names in LOSS_CONFIG_FIELDS.items() if name in names)
            warnings.warn(
                f"PolyDPOConfig.{name}={getattr(self, name)!r} has no effect: only the losses {readers} read it, and "
                f"loss_type is {self.loss_type}. Add one of them to loss_type, or leave {name} at its default "
                f"({defaults[name]!r}) to remove this warning.",
                UserWarning,
                stacklevel=4,
            )

    @classmethod
    def help_groups(cls) -> list[tuple[str, list[str]]]:
        """`--help` sections: this class's own fields as its docstring groups them (inherited ones go last)."""
        own = {f.name for f in fields(cls) if f.name in cls.__annotations__}
        return [(title, [n for n in names if n in own]) for title, names in docstring_groups(cls)]

    def diffusion_options(self) -> DiffusionOptions:
        """The fields the model family reads."""
        return DiffusionOptions(
            timestep_sampling=self.timestep_sampling,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            loss_weighting=self.loss_weighting,
            guidance_scale=self.guidance_scale,
            drop_t5_text_encoder=self.drop_t5_text_encoder,
            flow_shift=self.flow_shift,
            max_sequence_length=self.max_sequence_length,
        )

    def data_options(self) -> DataOptions:
        """The fields the data layer reads."""
        return DataOptions(
            dataset_schema=self.dataset_schema,
            prompt_column=self.prompt_column,
            chosen_column=self.chosen_column,
            rejected_column=self.rejected_column,
            category_column=self.category_column,
            resolution=self.resolution,
            aspect_ratio_buckets=self.aspect_ratio_buckets,
            drop_ties=self.drop_ties,
            strict=self.strict_data,
            seed=self.seed,
            max_image_pixels=self.max_image_pixels,
            num_frames=self.num_frames,
            fps=self.video_fps,
        )

    @property
    def frozen_dtype_name(self) -> str:
        """Dtype name of the frozen weights (see `torch_dtype`)."""
        if self.torch_dtype is not None:
            return self.torch_dtype
        if self.bf16:
            return "bfloat16"
        if self.fp16:
            return "float16"
        return "float32"


def _require(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"PolyDPOConfig.{name}={value!r} is out of range: it {rule}.")


def docstring_help(cls: type) -> dict[str, str]:
    """Each documented field's description in `cls`'s TRL-style docstring, joined into one line: the `--help` text."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in (cls.__doc__ or "").splitlines():
        header = re.match(r"^ {8}([a-z_0-9]+(?: / [a-z_0-9]+)*) \(", line)
        if header:
            current = []
            for name in header.group(1).split(" / "):
                entries[name] = current
        elif line.startswith(" " * 12) and current is not None:
            current.append(line.strip())
        elif line.strip():
            current = None
    return {name: " ".join(words) for name, words in entries.items()}


def docstring_groups(cls: type) -> list[tuple[str, list[str]]]:
    """The docstring's groups (`> Parameters that control the loss`) and the fields each documents, in order."""
    groups: list[tuple[str, list[str]]] = []
    for line in (cls.__doc__ or "").splitlines():
        title = re.match(r"^ {8}> (.+)$", line)
        header = re.match(r"^ {8}([a-z_0-9]+(?: / [a-z_0-9]+)*) \(", line)
        if title:
            groups.append((title.group(1), []))
        elif header and groups:
            groups[-1][1].extend(header.group(1).split(" / "))
    return groups


def _use_docstring_as_help(cls: type) -> None:
    # One source of truth: the docstring's sentences are what `--help` prints for this class's own fields.
    documented = docstring_help(cls)
    for f in fields(cls):
        if f.name in documented and f.name in cls.__annotations__ and "help" not in f.metadata:
            # argparse formats help with %-interpolation: a literal % must be doubled.
            f.metadata = MappingProxyType({**f.metadata, "help": documented[f.name].replace("%", "%%")})


_use_docstring_as_help(PolyDPOConfig)
