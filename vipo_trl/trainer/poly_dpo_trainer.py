"""`PolyDPOTrainer`: preference optimization of diffusion and flow models on top of `transformers.Trainer`."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sized
from typing import Any

import torch
from accelerate.utils import DynamoBackend, compile_regions
from diffusers import DiffusionPipeline
from diffusers.training_utils import cast_training_params
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import EvalPrediction, PredictionOutput, set_seed
from transformers.utils import logging

from ..data import (
    VIPO_CATEGORIES,
    CategoryBalancedSampler,
    LatentCacheCollator,
    LatentCacheDataset,
    PreferenceCollator,
    PreferenceDataError,
    PreferencePairs,
    StreamingPreferencePairs,
    is_latent_cache,
    pairs_from_options,
)
from ..data.cache import empty_prompt_file
from ..data.sampling import BucketSampler
from ..losses import DenoisingErrors, get_loss, implicit_rewards
from ..models import DiffusionFamily, family_from_pipeline, fuse_aligned_weights, load_family
from ..models.base import (
    DENOISER_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    check_lora_config,
    check_lora_file,
    randn_like_rows,
    save_gathered_weights,
    to_device,
)
from ..models.generation import published_name, started_from
from ..utils import stable_seed
from .cache_builder import cache_settings
from .model_card import build_model_card
from .poly_dpo_config import PolyDPOConfig
from .trackers import make_config_trackable, upload_saved_model_to_wandb
from .validation import ValidationImagesCallback

logger = logging.get_logger(__name__)

CONFIG_NAME = "poly_dpo_config.json"
CATEGORY_METRICS = ("loss", "rewards/accuracies", "rewards/margins")


def _check_data_before_loading(train_dataset: Any, eval_dataset: Any, args: PolyDPOConfig) -> None:
    """What the datasets alone can tell, raised before a model of many GB is loaded: a `DatasetDict` passed whole as
    the training set, columns the schema needs but the data lacks, a stream with no `max_steps`, and a latent cache
    without the empty prompt `proportion_empty_prompts` needs."""
    if train_dataset is not None and args.max_steps <= 0 and not isinstance(train_dataset, (Sized, str, os.PathLike)):
        raise ValueError(
            "train_dataset is a stream (it has no length), so num_train_epochs cannot say when to stop: set "
            "max_steps (PolyDPOConfig.max_steps, --max_steps)."
        )
    named = [("train_dataset", train_dataset)]
    if isinstance(eval_dataset, dict):  # several named evaluation sets (a DatasetDict too), as in `Trainer`
        named += [(f"eval_dataset[{key!r}]", value) for key, value in eval_dataset.items()]
    else:
        named.append(("eval_dataset", eval_dataset))
    options = args.data_options()
    for name, dataset in named:
        if isinstance(dataset, dict):
            splits = list(dataset)
            raise PreferenceDataError(
                f"{name} is a DatasetDict (splits {splits}): pass one split, e.g. "
                f"{name}=dataset[{(splits[0] if splits else 'train')!r}]."
            )
        columns = getattr(dataset, "column_names", None)
        if columns and not (is_latent_cache(dataset) or isinstance(dataset, LatentCacheDataset)):
            try:
                options.columns_of(columns)
            except PreferenceDataError as exc:
                raise PreferenceDataError(f"{name}: {exc}") from None
    if args.proportion_empty_prompts and is_latent_cache(train_dataset):
        empty_prompt_file(train_dataset)  # a cache built by an older version has none: refused, naming the fix


def _check_processes_train_together(args: PolyDPOConfig) -> None:
    """Several launched processes that transformers does not join into one run (on a machine without GPUs, unless
    `use_cpu` is set) would each train the whole run alone, writing the same `output_dir`: refused."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size == 1:
        raise ValueError(
            f"This process is one of {launched} launched (WORLD_SIZE={launched}), but transformers runs each alone "
            f"(parallel mode {args.parallel_mode.value!r}): every process would train the whole run separately and "
            "write the same output_dir. On a machine without GPUs set use_cpu=True (--use_cpu) so that the processes "
            "train together over gloo, or launch a single process."
        )


class PolyDPOTrainer(Trainer):
    """Trainer for Poly-DPO and the other preference losses of `vipo_trl.losses` on diffusion/flow models.

    Per step, for a batch of pairs (prompt, chosen image, rejected image):

    1. encode both images with the frozen VAE and the prompt with the frozen text encoder(s), or read both from a
       latent cache;
    2. draw one noise sample and one timestep per pair, shared by chosen and rejected; the draw is a function of
       `(seed, step, row_index)` alone, so it does not depend on the batch composition, the rank or a resume;
    3. one policy forward on the concatenated pair batch;
    4. one reference forward without gradients (LoRA: the same network with its adapters disabled; full fine-tuning:
       a frozen copy), skipped when no selected loss needs the reference;
    5. per-sample denoising errors -> `DenoisingErrors` -> the weighted sum of the selected losses.

    Args:
        model: a hub id or local folder of a diffusers pipeline (its `model_index.json` picks the family), a loaded
            `DiffusionPipeline` (used as it is: e.g. one whose earlier LoRA you fused), or a `DiffusionFamily`.
        args: a `PolyDPOConfig`.
        train_dataset / eval_dataset: a `datasets.Dataset` or streaming `datasets.IterableDataset` in Pick-a-Pic v2's
            or the generic schema, or the folder of a latent cache (`vipo_trl.build_latent_cache`). When every
            dataset is a cache, neither VAE nor text encoders are loaded.
        peft_config: a `peft.LoraConfig` to train a LoRA (DoRA, rsLoRA and `lora_bias` included); `None` fine-tunes
            the whole denoiser. What a pipeline's `load_lora_weights` cannot load (`modules_to_save`,
            `target_parameters`, `bias` other than "none", other adapter types) is refused before loading.
        ref_model: the reference, as in `trl.DPOTrainer`. `None` (default): the base network with its LoRA
            adapters disabled (LoRA), or a frozen copy of the denoiser (full fine-tuning). A folder holding
            `pytorch_lora_weights.safetensors` (an earlier run's output): the base with that LoRA, held as a second,
            frozen LoRA adapter of the same network under LoRA training (no second copy of the base). A pipeline
            folder, a denoiser folder (`config.json`), a loaded `DiffusionPipeline` or an `nn.Module`: that
            denoiser, frozen. A hub id (`org/name`) of a LoRA, pipeline or denoiser repo is read as that folder
            (of a pipeline, only the denoiser is downloaded) and recorded by its id.
        quantization_config: a `diffusers.BitsAndBytesConfig` (or `transformers`' one): QLoRA, the frozen base
            denoiser loaded in 4 or 8 bits with the LoRA trained on top in float32. Needs `peft_config` and a CUDA
            GPU (diffusers' bitsandbytes quantizer does not run on the CPU).
        start_from: an earlier run's output (a LoRA folder or hub id, or a full fine-tune's folder), or several in
            order, made part of the model's own weights before training (`vipo_trl.models.fuse_aligned_weights`):
            the policy starts from that model and, unless `ref_model` names another, it is the reference too. The
            second stage of "SFT, then Poly-DPO" (train `loss_type="sft"`, then start from it), or a round of
            alignment that continues the last. The model card's loading code rebuilds it (fuse, then load this
            run's LoRA).
        data_collator: defaults to a `PreferenceCollator` (or `LatentCacheCollator`) built from `args`.
        compute_metrics: as in `trl.DPOTrainer`, a function of a `transformers.EvalPrediction` whose `predictions`
            are each evaluated pair's implicit rewards `[chosen, rejected]` and `label_ids` its dataset row (see
            `predict`); what it returns is logged with the evaluation's metrics.
        callbacks, optimizers: as in `transformers.Trainer`.

    The trainer reads `args` and never rewrites it: `beta=None` resolves to the family's value in `self.beta`
    (logged as `beta_resolved`, saved beside the config and in the model card).
    """

    def __init__(
        self,
        model: str | os.PathLike | DiffusionPipeline | DiffusionFamily,
        args: PolyDPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        peft_config: Any = None,
        data_collator: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        ref_model: str | os.PathLike | DiffusionPipeline | nn.Module | None = None,
        quantization_config: Any = None,
        start_from: str | os.PathLike | list[str | os.PathLike] | None = None,
        compute_metrics: Callable[[EvalPrediction], dict[str, float]] | None = None,
    ):
        if args is None:
            args = PolyDPOConfig(output_dir="poly-dpo-output")
        if not isinstance(args, PolyDPOConfig):
            raise TypeError(f"`args` must be a PolyDPOConfig, got {type(args).__name__}.")
        # Seed before LoRA layers are created, so their initialisation is reproducible.
        set_seed(args.seed)

        datasets = [train_dataset, *(eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset])]
        datasets = [d for d in datasets if d is not None]
        _check_data_before_loading(train_dataset, eval_dataset, args)
        _check_processes_train_together(args)
        from_cache = bool(datasets) and all(is_latent_cache(d) or isinstance(d, LatentCacheDataset) for d in datasets)
        if quantization_config is not None and peft_config is None:
            raise ValueError(
                "quantization_config loads the base denoiser in 4/8 bits, which cannot be fine-tuned whole: pass a "
                "peft_config as well (QLoRA trains a LoRA on the quantized base)."
            )
        if peft_config is not None:
            check_lora_config(peft_config)
        self._ref_model_name = reference_name(ref_model)  # as named: a hub id stays a hub id, not a cache path
        if any(get_loss(name).needs_reference for name in args.loss_type):  # (else ignored, with a warning)
            ref_model = _hub_lora_snapshot(ref_model)
        if _lora_folder(ref_model) is not None:
            check_lora_file(os.fspath(ref_model))
        if isinstance(model, DiffusionFamily):
            self.family = model
        elif isinstance(model, DiffusionPipeline):
            self.family = family_from_pipeline(model, options=args.diffusion_options())
        else:
            with _frozen_encoders_loaded_whole():
                self.family = load_family(
                    model,
                    revision=args.revision,
                    variant=args.variant,
                    frozen_dtype=getattr(torch, args.frozen_dtype_name),
                    options=args.diffusion_options(),
                    encoders=not from_cache,
                    quantization_config=quantization_config,
                )
        for weights in [start_from] if isinstance(start_from, (str, os.PathLike)) else start_from or []:
            fuse_aligned_weights(self.family.pipeline, str(weights))
            # (a full fine-tune's output puts its own denoiser in the pipeline's place)
            self.family.denoiser = getattr(self.family.pipeline, self.family.denoiser_name)
        #: `args.beta`, or the family's recommended value when that is None; what every loss reads.
        self.beta = args.beta if args.beta is not None else self.family.recommended_beta
        if args.beta is None:
            logger.info("beta=None: using %s's recommended beta=%s.", type(self.family).__name__, self.beta)
        self.family.warn_if_far_from_native(args.resolution)
        self._loss_config = _LossConfig(args, self.beta)
        self.loss_specs = [get_loss(name) for name in args.loss_type]
        self.needs_reference = any(spec.needs_reference for spec in self.loss_specs)
        #: Whether any selected loss reads the rejected sample; if none does, it is neither encoded nor run.
        self.needs_rejected = any(spec.needs_rejected or spec.needs_reference for spec in self.loss_specs)
        self.is_lora = peft_config is not None
        if self.is_lora and not peft_config.target_modules:
            peft_config = dataclasses.replace(peft_config, target_modules=list(self.family.lora_target_modules))
        self._prepare_denoiser(args, peft_config, ref_model)

        train_pairs = self._prepare_dataset(train_dataset, args)
        if isinstance(eval_dataset, dict):
            eval_pairs = {name: self._prepare_dataset(ds, args) for name, ds in eval_dataset.items()}
        else:
            eval_pairs = self._prepare_dataset(eval_dataset, args)
        if data_collator is None:
            data_collator = (
                LatentCacheCollator()
                if isinstance(train_pairs, LatentCacheDataset)
                else PreferenceCollator(args.resolution, args.center_crop, args.random_flip)
            )
        self.categories = self._category_names(train_pairs, args)
        make_config_trackable(self.family.denoiser)  # report_to's callbacks read model.config as a transformers config

        super().__init__(
            model=self.family.denoiser,
            args=args,
            data_collator=data_collator,
            train_dataset=train_pairs,
            eval_dataset=eval_pairs,
            callbacks=[_PreferenceDataCallback(self), *(callbacks or [])],
            optimizers=optimizers,
            compute_metrics=compute_metrics,
        )
        # Our loss is a per-batch mean: let Trainer divide it by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        upload_saved_model_to_wandb(self)  # W&B's end-of-training model artifact: our saved files, not a pickle
        if args.validation_prompts:
            self.add_callback(
                ValidationImagesCallback(self, args.validation_prompts, args.validation_steps, seed=args.seed)
            )
        self.family.to(self.accelerator.device)
        #: What a pair drawn by `proportion_empty_prompts` is conditioned on (one row), or None.
        self.empty_prompt: dict[str, torch.Tensor] | None = None
        if args.proportion_empty_prompts:
            source = train_pairs if isinstance(train_pairs, LatentCacheDataset) else self.family
            empty = source.empty_prompt_conditioning()
            self.empty_prompt = {k: v.to(self.accelerator.device) for k, v in empty.items()}
        if self.ref_denoiser is not None:
            self.ref_denoiser = self._prepare_reference(self.ref_denoiser)
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._category_sums = {
            mode: torch.zeros(2, len(CATEGORY_METRICS), len(self.categories)) for mode in self._metrics
        }
        self.skipped_rows: Counter[str] = Counter()  # bad rows passed over in training, by reason
        # Rows whose labels were unusable never reach a batch; they are counted with the rest.
        self.skipped_rows.update(reason for _, reason in getattr(train_pairs, "label_skips", []))
        self.nonfinite_steps = 0  # optimizer steps skipped for a non-finite loss or gradient
        self._nonfinite_since_log = 0
        #: Recorded in the model card; the command line sets it from --dataset_name (a list: a mixture's sets).
        self.dataset_name: str | list[str] | None = _dataset_name(train_dataset)
        self._skipped_since_log: Counter[str] = Counter()

    def _prepare_denoiser(self, args: PolyDPOConfig, peft_config: Any, ref_model: Any) -> None:
        denoiser = self.family.denoiser
        frozen_dtype = getattr(torch, args.frozen_dtype_name)
        self.ref_denoiser: nn.Module | None = None
        #: Name of the frozen LoRA adapter that makes the reference (`ref_model` = a LoRA folder, LoRA training).
        self.ref_adapter: str | None = None
        ref_lora = _lora_folder(ref_model)
        if ref_model is not None and not self.needs_reference:
            logger.warning("ref_model is ignored: no selected loss (%s) reads a reference.", args.loss_type)
            ref_model = ref_lora = None
        if ref_lora is not None:
            check_reference_lora_base(ref_lora, self.family.fused_runs, name=self._ref_model_name)
        #: The reference as recorded beside the weights (a resume must use the same; `reference_name`).
        self.ref_model_name = None if ref_model is None else self._ref_model_name
        if self.is_lora:
            denoiser.requires_grad_(False)
            if denoiser.dtype != frozen_dtype and not _is_quantized(denoiser):
                denoiser.to(frozen_dtype)
            _add_lora(denoiser, peft_config, self.family.lora_target_modules)
            if ref_lora is not None:
                # The earlier LoRA becomes a second adapter of the same network, switched on only for the reference.
                self.ref_adapter = "reference"
                with warnings.catch_warnings():  # peft warns of a second adapter: here it is the point
                    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                    denoiser.load_lora_adapter(
                        ref_lora,
                        weight_name=LORA_WEIGHT_NAME,
                        prefix=self.family.denoiser_name,
                        adapter_name=self.ref_adapter,
                    )
                denoiser.set_adapter("default")
                # The reference is one fixed model: the earlier LoRA's dropout (TRL's --lora_dropout defaults to 0.05)
                # would make each of its forwards another random network, Trainer keeping the model in training mode.
                for layer in denoiser.modules():
                    if isinstance(layer, BaseTunerLayer) and self.ref_adapter in getattr(layer, "lora_dropout", {}):
                        layer.lora_dropout[self.ref_adapter] = nn.Identity()
            cast_training_params(denoiser, dtype=torch.float32)  # trainable LoRA weights are kept in float32
        else:
            if denoiser.dtype != torch.float32:
                denoiser.float()  # full fine-tuning trains float32 weights (mixed precision casts on the fly)
            denoiser.requires_grad_(True)
        if self.needs_reference and self.ref_adapter is None and (ref_model is not None or not self.is_lora):
            self.ref_denoiser = _reference_denoiser(self.family, ref_model).requires_grad_(False)
            reference_dtype = next(self.ref_denoiser.parameters()).dtype
            if reference_dtype != frozen_dtype:  # (diffusers warns on every `.to(dtype)`, even a no-op)
                self.ref_denoiser.to(frozen_dtype)
            self.ref_denoiser.eval()
        # `activation_checkpointing` since transformers 5.2x, `gradient_checkpointing` (now its alias) before
        if getattr(args, "activation_checkpointing", False) or args.gradient_checkpointing:
            # Trainer switches checkpointing on through `activation_checkpointing_enable` (older transformers:
            # `gradient_checkpointing_enable`), which transformers models have and diffusers networks do not: give
            # the denoiser both, calling diffusers' own switch.
            family = self.family
            family.enable_gradient_checkpointing()
            denoiser.activation_checkpointing_enable = lambda **_: family.enable_gradient_checkpointing()
            denoiser.gradient_checkpointing_enable = denoiser.activation_checkpointing_enable

    def _prepare_reference(self, reference: nn.Module) -> nn.Module:
        """The frozen reference copy, placed as TRL's DPOTrainer places its reference: under DeepSpeed ZeRO-3 or FSDP
        it is sharded like the policy (TRL's `prepare_deepspeed` / `prepare_fsdp`), not held whole on every rank."""
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            return prepare_deepspeed(reference, self.accelerator)
        if self.is_fsdp_enabled:
            from trl.models.utils import prepare_fsdp

            return prepare_fsdp(reference, self.accelerator)
        reference = reference.to(self.accelerator.device)
        dynamo = self.accelerator.state.dynamo_plugin
        if dynamo.backend != DynamoBackend.NO:
            # accelerate compiles only the model it prepares; the reference forward is a quarter of a full
            # fine-tuning step, so it is compiled the same way (a LoRA reference already runs through the policy's
            # compiled module).
            compile_fn = compile_regions if dynamo.use_regional_compilation else torch.compile
            reference = compile_fn(reference, **dynamo.to_kwargs())
        return reference

    def _prepare_dataset(self, dataset: Any, args: PolyDPOConfig) -> Any:
        if dataset is None or isinstance(dataset, (PreferencePairs, StreamingPreferencePairs)):
            return dataset
        if is_latent_cache(dataset) or isinstance(dataset, LatentCacheDataset):
            cache = dataset if isinstance(dataset, LatentCacheDataset) else LatentCacheDataset(dataset)
            self._check_cache(cache, args)
            return cache
        if isinstance(dataset, (str, os.PathLike)):
            raise PreferenceDataError(
                f"{dataset} is not a latent cache folder; pass a datasets.Dataset, or build a cache with "
                "vipo_trl.build_latent_cache."
            )
        pairs = pairs_from_options(dataset, args.data_options(), self.family.bucket_divisibility)
        if args.aspect_ratio_buckets and isinstance(pairs, StreamingPreferencePairs):
            raise PreferenceDataError(
                "aspect_ratio_buckets needs to know each pair's bucket before batching, which a streaming dataset "
                "cannot tell: build a latent cache with the same setting (it buckets while streaming) and train on it."
            )
        return pairs

    def _check_cache(self, cache: LatentCacheDataset, args: PolyDPOConfig) -> None:
        expected = cache_settings(args, self.family, self.family.name_or_path)
        found = cache.settings
        keys = ["pipeline", "resolution", "max_sequence_length", "drop_t5_text_encoder", "num_frames", "video_fps"]
        keys += ["aspect_ratio_buckets"]
        if self.family.name_or_path is not None:
            keys += ["model", "revision", "variant"]
        wrong = [f"{k}: cache {found.get(k)!r} vs now {expected[k]!r}" for k in keys if found.get(k) != expected[k]]
        if wrong:
            raise PreferenceDataError(
                f"The latent cache {cache.path} was made for another model or preprocessing ({'; '.join(wrong)}). "
                "Set those fields as the cache has them, rebuild it with these (`vipo-trl cache` or "
                "vipo_trl.build_latent_cache), or train on the raw dataset."
            )
        for key in ("center_crop", "random_flip", "seed"):
            if found.get(key) != expected[key]:
                logger.warning(
                    "The latent cache was built with %s=%r (now %r): its crops and flips are fixed at cache time.",
                    key,
                    found.get(key),
                    expected[key],
                )

    @staticmethod
    def _category_names(dataset: Any, args: PolyDPOConfig) -> list[str]:
        if not args.category_column:
            return []
        if hasattr(dataset, "categories"):
            return dataset.categories()
        return list(VIPO_CATEGORIES)  # a stream: the ViPO categories (others are not itemised in the logs)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.category_balanced:
            if not hasattr(dataset, "category_of_rows"):
                raise PreferenceDataError("category_balanced=True needs a map-style dataset (or a latent cache).")
            return CategoryBalancedSampler(dataset.category_of_rows(), seed=self.args.seed)
        if self.args.aspect_ratio_buckets:
            # Consecutive runs of one batch share a bucket; accelerate hands whole batches to each process.
            return BucketSampler(dataset.bucket_of_rows(), self._train_batch_size, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)

    # ------------------------------------------------------------------ the algorithm

    def _pair_generators(self, row_index: list[int], salt: int) -> list[torch.Generator]:
        """One generator per pair, seeded by (seed, salt, row): the pair's noise, timestep and latent sample."""
        return [torch.Generator().manual_seed(stable_seed(self.args.seed, "noise", salt, row)) for row in row_index]

    def denoising_errors(self, model: nn.Module, inputs: dict[str, Any], salt: int) -> DenoisingErrors:
        """Per-sample denoising errors of the policy (and the reference, when a loss needs it)."""
        family = self.family
        device = self.accelerator.device
        generators = self._pair_generators(inputs["row_index"], salt)

        # The batch is [chosen..., rejected...], or [chosen...] alone when no selected loss reads the rejected.
        sides = ("chosen", "rejected") if self.needs_rejected else ("chosen",)
        if "latent_mean_chosen" in inputs:  # from a latent cache
            mean = torch.cat([inputs[f"latent_mean_{side}"] for side in sides]).float()
            std = torch.cat([inputs[f"latent_std_{side}"] for side in sides]).float()
            latents = family.latents_from_distribution(mean, std, generators * len(sides))
            conditioning = inputs["conditioning"]
        else:
            pixels = torch.cat([inputs[f"pixel_values_{side}"] for side in sides])
            latents = family.encode_images(pixels, generators * len(sides))
            conditioning = family.encode_conditioning(inputs)
        if salt >= 0 and self.empty_prompt is not None:  # training only: evaluation keeps every prompt
            conditioning = self._drop_prompts(conditioning, inputs["row_index"], salt)
        conditioning = {k: torch.cat([v] * len(sides)).to(device) for k, v in conditioning.items()}
        noise = randn_like_rows(latents[: len(generators)], generators)
        noise = torch.cat([noise] * len(sides))
        timesteps = family.sample_timesteps(generators)
        timesteps = to_device(torch.cat([timesteps] * len(sides)), device)
        noisy_input, target = family.noisy_input_and_target(latents, noise, timesteps)
        weights = family.error_weights(timesteps)

        def errors_of(prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            errors = _per_sample_mse(prediction, target)
            errors = errors if weights is None else errors * weights
            return tuple(errors.chunk(2)) if len(sides) == 2 else (errors, None)

        ref_chosen = ref_rejected = None
        if self.needs_reference:
            # inference_mode skips autograd bookkeeping entirely; the clones turn the results back into ordinary
            # tensors that the loss may combine with the policy's. Not under FSDP with LoRA: the reference runs
            # through the policy's own module, whose root keeps the weights it gathered for a forward; gathered in
            # inference mode they would be inference tensors, on which the policy's forward builds no graph.
            shared_fsdp_module = self.is_fsdp_enabled and self.ref_denoiser is None
            with torch.no_grad() if shared_fsdp_module else torch.inference_mode():
                ref_chosen, ref_rejected = errors_of(
                    self._reference_prediction(model, noisy_input, timesteps, conditioning)
                )
            ref_chosen, ref_rejected = ref_chosen.clone(), ref_rejected.clone()

        _, policy_dtype = self._unwrapped(model)
        policy_chosen, policy_rejected = errors_of(
            family.predict(model, noisy_input, timesteps, conditioning, policy_dtype)
        )
        return DenoisingErrors(policy_chosen, policy_rejected, ref_chosen, ref_rejected)

    def _drop_prompts(
        self, conditioning: dict[str, torch.Tensor], row_index: list[int], salt: int
    ) -> dict[str, torch.Tensor]:
        """`proportion_empty_prompts`: the drawn pairs' prompt embeddings replaced by those of no prompt. The draw,
        like the noise, depends on (seed, step, row) alone; other keys (SDXL's size and crop ids) are kept."""
        share = self.args.proportion_empty_prompts
        drawn = [stable_seed(self.args.seed, "empty_prompt", salt, row) / 2**63 < share for row in row_index]
        if not any(drawn):
            return conditioning
        conditioning = dict(conditioning)
        mask = to_device(torch.tensor(drawn), next(iter(conditioning.values())).device)
        for key, empty in self.empty_prompt.items():
            value = conditioning[key]
            conditioning[key] = torch.where(mask.view(-1, *[1] * (value.dim() - 1)), empty.to(value), value)
        return conditioning

    def _unwrapped(self, model: nn.Module) -> tuple[nn.Module, torch.dtype]:
        """`model` without its DDP/FSDP/DeepSpeed wrapper (a compile wrapper kept) and that network's dtype, worked out
        once per wrapped model: both walk every submodule (about 6 ms of Python a call at SD1.5 size, two calls a
        step), time a GPU can wait for."""
        cached = getattr(self, "_unwrapped_model", None)
        if cached is None or cached[0] is not model:
            network = self.accelerator.unwrap_model(model)
            lora_layers = [m for m in network.modules() if isinstance(m, BaseTunerLayer)]
            cached = self._unwrapped_model = (model, network, network.dtype, lora_layers)
        return cached[1], cached[2]

    def _switch_to_reference(self, model: nn.Module, reference: bool) -> None:
        self._unwrapped(model)
        switch_lora_layers(self._unwrapped_model[3], reference, self.ref_adapter)

    def _reference_prediction(self, model, noisy_input, timesteps, conditioning) -> torch.Tensor:
        if self.ref_denoiser is not None:
            ref = self.ref_denoiser
            return self.family.predict(ref, noisy_input, timesteps, conditioning, next(ref.parameters()).dtype)
        # LoRA: the reference is the same network with its adapters disabled (or only the reference LoRA on);
        # never a second copy of the weights.
        network, dtype = self._unwrapped(model)
        self._switch_to_reference(model, True)
        try:
            return self.family.predict(network, noisy_input, timesteps, conditioning, dtype)
        finally:
            self._switch_to_reference(model, False)  # the policy's LoRA on again

    def preference_loss(self, errors: DenoisingErrors) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the selected losses, and each loss's value and metrics."""
        loss = 0.0
        metrics: dict[str, torch.Tensor] = {}
        for spec, weight in zip(self.loss_specs, self.args.loss_weights):
            out = spec(errors, self._loss_config)
            loss = loss + weight * out.loss
            metrics[f"loss/{spec.name}"] = out.loss.detach()
            metrics.update({k: torch.as_tensor(v).detach() for k, v in out.metrics.items()})
        return loss, metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        # Evaluation uses fixed noise per pair (salt -1), so successive evaluations are comparable.
        salt = self.state.global_step if mode == "train" else -1
        errors = self.denoising_errors(model, inputs, salt)
        loss, metrics = self.preference_loss(errors)
        if mode == "train" and self.state.global_step != getattr(self, "_rows_step", None):
            self._nonfinite_rows, self._rows_step = None, self.state.global_step  # reported with a skipped step
        if mode == "train" and not torch.isfinite(loss):
            # The backward still runs (under DDP every rank must join the gradient all-reduce); the non-finite
            # gradients it makes are caught before the optimizer step, which is then skipped on every rank.
            self._nonfinite_rows = list(inputs["row_index"])
            return (loss, metrics) if return_outputs else loss
        metrics["errors/policy_chosen"] = errors.policy_chosen.detach().mean()
        if errors.policy_rejected is not None:
            metrics["errors/policy_rejected"] = errors.policy_rejected.detach().mean()
        if errors.has_reference:
            chosen, rejected = implicit_rewards(errors, self.beta)
            margins = (chosen - rejected).detach()
            metrics["rewards/chosen"] = chosen.detach().mean()
            metrics["rewards/rejected"] = rejected.detach().mean()
            metrics["rewards/margins"] = margins.mean()
            metrics["rewards/accuracies"] = (margins > 0).float().mean()
        for key, value in metrics.items():
            self._metrics[mode][key].append(value.float())
        if self.categories:
            self._record_categories(errors, inputs.get("categories") or [], mode)
        if mode == "train":
            self._skipped_since_log.update(reason for _, reason in inputs.get("skipped", []))
        if not return_outputs:
            return loss
        # Each pair's implicit rewards [chosen, rejected] for `predict` (NaN for a loss without a reference)
        if errors.has_reference:
            pair_rewards = torch.stack([chosen, rejected], dim=1).detach()
        else:
            pair_rewards = errors.policy_chosen.new_full((len(errors.policy_chosen), 2), float("nan"))
        return loss, {**metrics, "pair_rewards": pair_rewards}

    @torch.no_grad()
    def _record_categories(self, errors: DenoisingErrors, categories: list[Any], mode: str) -> None:
        index = {name: i for i, name in enumerate(self.categories)}
        sums = self._category_sums[mode]
        for name in set(map(str, categories)) & set(index):
            mask = torch.tensor([str(c) == name for c in categories], device=errors.policy_chosen.device)
            subset = DenoisingErrors(*(None if t is None else t.detach()[mask] for t in vars(errors).values()))
            values = [self.preference_loss(subset)[0]]
            if subset.has_reference:
                chosen, rejected = implicit_rewards(subset, self.beta)
                values += [((chosen - rejected) > 0).float().mean(), (chosen - rejected).mean()]
            for m, value in enumerate(values):
                sums[0, m, index[name]] += float(value) * int(mask.sum())
                sums[1, m, index[name]] += int(mask.sum())

    # ------------------------------------------------------------------ the non-finite guard

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        step = optimizer.step

        def guarded_step(*args, **kwargs):
            if self._gradients_are_finite():
                self._last_finite = {"step": self.state.global_step}
                return step(*args, **kwargs)
            self._skip_nonfinite_step()
            return None

        optimizer.step = guarded_step  # accelerate's wrapper calls this attribute
        return optimizer

    def _get_grad_norm(self, model, grad_norm=None):
        # Trainer computes the total gradient norm before every optimizer step (clipping or not); it is non-finite
        # exactly when some gradient is, so the guard reads it instead of scanning every gradient again.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._step_grad_norm = grad_norm
        return grad_norm

    def _gradients_are_finite(self) -> bool:
        norm, self._step_grad_norm = getattr(self, "_step_grad_norm", None), None
        if norm is not None:
            return math.isfinite(float(norm))
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _skip_nonfinite_step(self) -> None:
        self.nonfinite_steps += 1
        self._nonfinite_since_log += 1
        rows = getattr(self, "_nonfinite_rows", None)
        logger.warning(
            "Non-finite loss or gradient at step %d (rows %s): optimizer step skipped (%d of at most %d).",
            self.state.global_step,
            rows,
            self.nonfinite_steps,
            self.args.max_nonfinite_steps,
        )
        if self.nonfinite_steps > self.args.max_nonfinite_steps:
            last = [h for h in self.state.log_history if "loss" in h]
            raise FloatingPointError(
                f"{self.nonfinite_steps} optimizer steps had a non-finite loss or gradient, more than "
                f"max_nonfinite_steps={self.args.max_nonfinite_steps}; the last at step {self.state.global_step} "
                f"(rows {rows}). Last finite logged values: {last[-1] if last else 'none yet'}. Lower the learning "
                "rate or beta, check those rows, or raise max_nonfinite_steps."
            )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """`Trainer.evaluate`, also accepting a raw preference dataset (or a cache folder), prepared like the training
        set."""
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._prepare_dataset(v, self.args) for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._prepare_dataset(eval_dataset, self.args)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test") -> PredictionOutput:
        """`Trainer.predict` on a preference set (raw, or a cache folder, prepared like the training set): the metrics
        as `evaluate` gives them (`test_` prefixed), and per pair `predictions[i] = [reward_chosen, reward_rejected]`
        (the implicit rewards `-0.5 * beta * (e - e_ref)`, same fixed noise as `evaluate`; NaN for a loss without a
        reference) with `label_ids[i]` the dataset row it is for (rows training skips, such as ties, have none)."""
        output = super().predict(
            self._prepare_dataset(test_dataset, self.args), ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )
        output.metrics.update(self._collected_metrics("eval", f"{metric_key_prefix}_"))  # (no log call to take them)
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        rows = torch.tensor(inputs["row_index"], device=loss.device)
        return loss.detach(), outputs["pair_rewards"], rows

    def _collected_metrics(self, mode: str, prefix: str) -> dict[str, float]:
        """The means of the metrics gathered since the last call, over every process, and their reset."""
        logs = {}
        for key, values in self._metrics[mode].items():
            value = torch.stack(values).mean().to(self.accelerator.device)
            logs[prefix + key] = self.accelerator.gather_for_metrics(value).mean().item()
        self._metrics[mode].clear()
        if self.categories:
            sums = self.accelerator.reduce(self._category_sums[mode].to(self.accelerator.device), reduction="sum")
            for m, metric in enumerate(CATEGORY_METRICS):
                for c, name in enumerate(self.categories):
                    if sums[1, m, c] > 0:
                        logs[f"{prefix}category/{name}/{metric}"] = (sums[0, m, c] / sums[1, m, c]).item()
            self._category_sums[mode].zero_()
        return logs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else "eval"
        logs.update(self._collected_metrics(mode, "eval_" if mode == "eval" else ""))
        if mode == "train" and self._nonfinite_since_log:
            logs["nonfinite/skipped_steps"] = self._nonfinite_since_log
            self._nonfinite_since_log = 0
        if mode == "train":
            for reason, count in self._skipped_since_log.items():
                logs[f"data/skipped/{reason}"] = count
            self.skipped_rows.update(self._skipped_since_log)
            self._skipped_since_log.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ saving and loading

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not (self.is_deepspeed_enabled and self.is_lora):
            return super().save_model(output_dir, _internal_call)
        # LoRA under DeepSpeed: gather only the LoRA's parameters (ZeRO-3 partitions them too), on every rank, not the
        # whole network, which ZeRO-3 gathers only with `stage3_gather_16bit_weights_on_model_save` and at the cost
        # of the full model's memory, to save a few MB.
        import deepspeed

        lora = {name: p for name, p in self.model.named_parameters() if "lora_" in name}
        with deepspeed.zero.GatheredParameters(list(lora.values())):
            state_dict = {name: p.detach().cpu().clone() for name, p in lora.items()}
        self._save(output_dir, state_dict=state_dict)
        if self.args.push_to_hub and not _internal_call:  # as Trainer.save_model does
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        # Written into a scratch folder first, then each file renamed into place (atomic on POSIX): a crash while
        # saving leaves every file of the previous save whole, never a half-written weights file.
        scratch = tempfile.mkdtemp(prefix=".saving-", dir=output_dir)
        try:
            denoiser = self.accelerator.unwrap_model(self.model)
            # Under FSDP (FULL_STATE_DICT) and DeepSpeed, `save_model` passes the state dict gathered from every
            # rank: the module's own parameters are shards then, and saving them would write (or fail on) shards.
            if self.is_lora:
                self.family.save_lora(scratch, denoiser, state_dict)
            elif state_dict is None:
                denoiser.save_pretrained(scratch, safe_serialization=True)
            elif not state_dict:  # ZeRO-3 without stage3_gather_16bit_weights_on_model_save: Trainer passes {}
                logger.warning(
                    "No weights written to %s: DeepSpeed ZeRO-3 gathers them only with "
                    "`stage3_gather_16bit_weights_on_model_save: true` (accelerate config: `zero3_save_16bit_model`); "
                    "until then they are in DeepSpeed's checkpoint files (recover them with its zero_to_fp32.py).",
                    output_dir,
                )
            else:
                save_gathered_weights(denoiser, state_dict, scratch)
            with open(os.path.join(scratch, CONFIG_NAME), "w") as f:
                json.dump({**self.args.to_dict(), "beta_resolved": self.beta}, f, indent=2, sort_keys=True)
            with open(os.path.join(scratch, "vipo_trl_model.json"), "w") as f:
                description = {**self.family.describe(), "lora": self.is_lora, "loss_type": self.args.loss_type}
                description["started_from"] = self.family.fused_runs  # fused into the base before training
                # ... and by the names they are loaded by elsewhere (the Hub repo a pushed run records), which
                # `started_from` reads when this run is loaded from the Hub
                description["started_from_published"] = [[published_name(w), k] for w, k in self.family.fused_runs]
                description["ref_model"] = self.ref_model_name
                # Where the run is published, so the card of a later run started from this folder names the repo
                description["hub_model_id"] = self.hub_model_id if self.args.push_to_hub else None
                if self.is_lora:  # (the LoRA file's metadata says 0: see `DiffusionFamily.save_lora`)
                    description["lora_dropout"] = denoiser.peft_config["default"].lora_dropout
                json.dump(description, f, indent=2)
            for name in os.listdir(scratch):
                os.replace(os.path.join(scratch, name), os.path.join(output_dir, name))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` (or `"latest"`) resumes from the last *complete* checkpoint,
        skipping one a kill left half-written."""
        if resume_from_checkpoint is True or resume_from_checkpoint == "latest":
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint in {self.args.output_dir} to resume from.")
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            problem = resume_mismatch(str(resume_from_checkpoint), self.family.fused_runs, self.ref_model_name)
            if problem:
                raise ValueError(problem)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self.is_fsdp_enabled:
            # The sharded module loads accelerate's FSDP checkpoint (written beside ours by `Trainer`), each rank its
            # shards; our safetensors files hold the gathered weights, for pipelines and the Hub.
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        denoiser = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.is_lora:
            self.family.load_lora(resume_from_checkpoint, denoiser)
            return
        path = os.path.join(resume_from_checkpoint, DENOISER_WEIGHT_NAME)
        index_path = path + ".index.json"
        if os.path.isfile(path):
            state = load_file(path)
        elif os.path.isfile(index_path):
            with open(index_path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_file(os.path.join(resume_from_checkpoint, shard)))
        else:
            raise ValueError(f"No {DENOISER_WEIGHT_NAME} (or its shard index) in checkpoint {resume_from_checkpoint}.")
        denoiser.load_state_dict(state)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._replan_learning_rate(checkpoint)

    def _replan_learning_rate(self, checkpoint: str) -> None:
        """Resuming with another `max_steps` than the checkpoint was planned for (training a finished run longer):
        the scheduler is rebuilt for the new length, but the optimizer's learning rate comes back as the old plan left
        it (0 at the end of a linear decay), so the first resumed step would train at it. Set it from the new plan."""
        try:
            with open(os.path.join(checkpoint, "trainer_state.json")) as f:
                planned = json.load(f).get("max_steps")
        except (OSError, ValueError):
            return
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate wraps it
        same_plan = not planned or planned == self.state.max_steps
        if same_plan or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return  # the same plan (an interrupted run): the restored rate is right, and the resume exact
        old = [group["lr"] for group in scheduler.optimizer.param_groups]
        new = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, new):
            group["lr"] = lr
        scheduler._last_lr = list(new)
        steps, schedule = self.state.max_steps, getattr(self.args.lr_scheduler_type, "value", "this")
        logger.warning(
            "Resuming %s, planned for %d steps, with max_steps=%d: the %s learning-rate schedule continues as a "
            "%d-step run's, at %.4g from step %d (the old plan had reached %.4g).",
            *(checkpoint, planned, steps, schedule, steps, new[0], scheduler.last_epoch + 1, old[0]),
        )

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    # ------------------------------------------------------------------ the Hub

    @property
    def lora_config(self) -> Any:
        """The trained adapter's `peft.LoraConfig` (None for a full fine-tune)."""
        return getattr(self.accelerator.unwrap_model(self.model), "peft_config", {}).get("default")

    @property
    def lora_rank(self) -> int | None:
        return getattr(self.lora_config, "r", None)

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | list[str] | None = None, **kwargs
    ) -> None:
        """Write `README.md` in `output_dir`: base model, dataset, loss and its parameters, steps, final metrics, a
        sample grid when one was saved, and the snippet that loads the result into the family's pipeline. Called by
        `push_to_hub`."""
        if not self.is_world_process_zero():
            return
        repo_id = self.hub_model_id or model_name or os.path.basename(os.path.abspath(self.args.output_dir))
        card = build_model_card(self, repo_id, dataset_name or self.dataset_name)
        os.makedirs(self.args.output_dir, exist_ok=True)
        path = os.path.join(self.args.output_dir, "README.md")
        with tempfile.NamedTemporaryFile("w", dir=self.args.output_dir, suffix=".tmp", delete=False) as f:
            f.write(str(card))
        os.replace(f.name, path)  # a card is replaced whole, never half-written

    def _save_checkpoint(self, model, trial):
        # As TRL's trainers do: refresh the card in output_dir with every checkpoint, so a checkpoint pushed with
        # hub_strategy="checkpoint" or "every_save" carries a card that describes it.
        self.create_model_card(model_name=(self.args.hub_model_id or "").split("/")[-1] or None)
        return super()._save_checkpoint(model, trial)


class _PreferenceDataCallback(TrainerCallback):
    """Tells the training set which epoch starts (per-row augmentation varies by epoch yet survives a resume) and
    reports the bad rows skipped when an epoch ends."""

    def __init__(self, trainer: PolyDPOTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        dataset = self.trainer.train_dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(math.floor(state.epoch + 1e-6))

    def on_epoch_end(self, args, state, control, **kwargs):
        counts = self.trainer.skipped_rows + self.trainer._skipped_since_log
        if counts:
            logger.warning("Bad rows skipped so far: %s (set strict_data=True to stop at the first).", dict(counts))


def switch_lora_layers(layers: list[BaseTunerLayer], reference: bool, reference_adapter: str | None = None) -> None:
    """Turn a LoRA network into its reference (`reference=True`: adapters off, or only `reference_adapter` on) for a
    forward without gradients, and back to the policy (the "default" adapter on), on its LoRA `layers` found once.

    Only the two flags each LoRA layer's forward reads are flipped. diffusers' `disable_adapters`/`enable_adapters`
    and `set_adapter` also walk every module and reset each adapter's `requires_grad` and training mode, twice a step:
    12-18 ms of host time a step for SD1.5's UNet and 55-75 ms for SDXL's, against 0.3 and 1.4-2.1 ms here
    (`benchmarks/bench_adapter_switch.py`).
    The reference forward runs without gradients, so which LoRA weights require them does not matter there, and
    they are as the policy needs them when it is back. (peft's properties ask that these flags be set through those
    methods; the tests that compare the reference with the base network, or with a loaded earlier LoRA, fail if peft
    renames them.)"""
    for layer in layers:
        if reference_adapter is None:
            layer._disable_adapters = reference
        else:
            layer._active_adapter = [reference_adapter if reference else "default"]


def reference_name(ref_model: Any) -> str | None:
    """How a run's `ref_model` is recorded beside its weights: None (the model itself, with its adapters off, or a
    frozen copy), a folder by its absolute path, a hub id, or "<object>" for a model passed in (never compared)."""
    if ref_model is None:
        return None
    if isinstance(ref_model, (str, os.PathLike)):
        return os.path.abspath(ref_model) if os.path.exists(ref_model) else str(ref_model)
    return "<object>"


def resume_mismatch(checkpoint: str, started_from: list, ref_model_name: str | None) -> str | None:
    """Why resuming `checkpoint` with these settings would train something else, or None. A checkpoint's weights
    only mean something on the model they were trained from (`start_from`, as `fused_runs` lists it) and against the
    reference they were trained against (`reference_name`); its `vipo_trl_model.json` records both."""
    try:
        with open(os.path.join(checkpoint, "vipo_trl_model.json")) as f:
            described = json.load(f)
    except (OSError, ValueError):
        return None  # not written by this trainer: nothing recorded to compare
    reference = described.get("ref_model", ref_model_name)  # (not recorded before vipo-trl recorded it)
    if "<object>" not in (reference, ref_model_name) and reference != ref_model_name:
        return (
            f"{checkpoint} was trained against the reference {reference or 'the model itself'}, but this run's "
            f"reference is {ref_model_name or 'the model itself'}: pass the same ref_model (--ref_model) to resume it."
        )
    recorded = [list(run) for run in described.get("started_from") or []]
    current = [list(run) for run in started_from]
    if recorded != current:
        return (
            f"{checkpoint} was trained starting from {_run_names(recorded)}, but this run starts from "
            f"{_run_names(current)}: pass the same start_from (--start_from) to resume it."
        )
    return None


def _run_names(runs: list) -> Any:
    return [weights for weights, _ in runs] or "the base model alone"


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` whose `trainer_state.json` (written after the weights, optimizer, scheduler and RNG
    states) exists and parses; a checkpoint cut short by a kill has none, or a truncated one, and is passed over."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        state = os.path.join(output_dir, name, "trainer_state.json")
        if match and os.path.isfile(state):
            try:
                with open(state) as f:
                    json.load(f)
            except (OSError, ValueError):
                continue
            steps.append(int(match.group(1)))
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


class _LossConfig:
    """The config as the losses read it: `args` with `beta` resolved (the trainer never writes to `args`)."""

    def __init__(self, args: PolyDPOConfig, beta: float):
        self._args, self.beta = args, beta

    def __getattr__(self, name: str) -> Any:
        return getattr(self._args, name)


def _is_hub_id(name: Any) -> bool:
    return isinstance(name, str) and not os.path.exists(name) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def _hub_snapshot(repo_id: str, patterns: list[str], ignore: list[str] | None = None) -> str:
    """The local folder of `repo_id`'s files matching `patterns` (fetched, or from the Hub cache), or a one-line
    error naming the repo."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=ignore)
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise ValueError(
            f"ref_model={repo_id!r} is no local folder, and the Hub did not give it ({type(exc).__name__}: {reason}). "
            "Name a folder, or a Hub repo of a LoRA, a pipeline or a denoiser that you can reach."
        ) from None


def _hub_lora_snapshot(ref_model: Any) -> Any:
    """A `ref_model` hub id whose repo holds a LoRA (an earlier run pushed with `push_to_hub`) as the local snapshot
    of that LoRA; anything else unchanged (`_reference_denoiser` fetches a pipeline's denoiser: it knows which)."""
    if not _is_hub_id(ref_model):
        return ref_model
    folder = _hub_snapshot(ref_model, [LORA_WEIGHT_NAME, "vipo_trl_model.json"])
    return folder if os.path.isfile(os.path.join(folder, LORA_WEIGHT_NAME)) else ref_model


def check_reference_lora_base(
    ref_lora: str, fused_runs: list[tuple[str, str]], flags: bool = False, name: str | None = None
) -> None:
    """A LoRA reference is that LoRA on this run's base (as an adapter, or fused into a copy): right only when the
    LoRA was trained on top of the same runs this run started from (`start_from`); otherwise it would be a model
    nobody trained. `flags`: the message names the command line's flags; `name`: the reference as the user named it
    (a hub id for a fetched snapshot), whose earlier runs are then named by their repos."""
    trained_on = [tuple(run) for run in started_from(ref_lora)]
    here = [tuple(run) for run in fused_runs]
    described = os.path.join(ref_lora, "vipo_trl_model.json")
    published = trained_on
    if os.path.isfile(described):  # a LoRA fetched from the Hub names its starts by their repos
        with open(described) as f:
            published = [tuple(run) for run in json.load(f).get("started_from_published") or trained_on]
    if here in (trained_on, published):
        return
    if name is not None and name != ref_lora:
        ref_lora, trained_on = name, published

    def names(runs: list) -> str:
        return ", ".join(w for w, _ in runs) if runs else "the base model alone"

    ref, start = ("--ref_model ", "--start_from ") if flags else ("ref_model=", "start_from=")
    under = " ".join(w for w, _ in trained_on) if flags else repr([w for w, _ in trained_on])
    fixes = [f"To train on top of it, pass {start}{ref_lora} instead (it is then the reference too)"]
    if trained_on:
        fixes.append(f"to start from the runs under it and keep it as the reference, pass {start}{under}")
    raise ValueError(
        f"{ref}{ref_lora}: that LoRA was trained on top of {names(trained_on)}, but this run's base is {names(here)}, "
        f"and the LoRA on another base is another model. {'; '.join(fixes)}."
    )


def _lora_folder(ref_model: Any) -> str | None:
    if isinstance(ref_model, (str, os.PathLike)) and os.path.isfile(os.path.join(ref_model, LORA_WEIGHT_NAME)):
        return os.fspath(ref_model)
    return None


@contextlib.contextmanager
def _frozen_encoders_loaded_whole():
    """Under DeepSpeed ZeRO-3 transformers loads every model partitioned (`deepspeed.zero.Init`), for a DeepSpeed
    engine to gather in its forward. The pipeline's text encoders are frozen and run outside any engine, so they would
    run on empty parameters: load them whole, as diffusers' training examples do. (The denoiser is partitioned when
    Trainer wraps it, the reference by `prepare_deepspeed`.) accelerate's `zero3_init_context_manager(enable=False)`
    leaves transformers' ZeRO-3 switch on, so the switch itself is held off while loading."""
    from transformers.integrations import deepspeed as hf_deepspeed

    switch = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_config = switch() if switch is not None else None
    if hf_config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(hf_config)


def _reference_denoiser(family: DiffusionFamily, ref_model: Any) -> nn.Module:
    """The frozen reference network: a copy of the denoiser (with `ref_model`'s LoRA fused in, if it names one), or
    the denoiser `ref_model` names or holds."""
    if ref_model is None:
        return copy.deepcopy(family.denoiser)
    if isinstance(ref_model, nn.Module):
        return ref_model
    if isinstance(ref_model, DiffusionPipeline):
        return getattr(ref_model, family.denoiser_name)
    path = os.fspath(ref_model)
    if _is_hub_id(path):  # a pipeline repo (only its denoiser is fetched) or a fine-tuned denoiser's repo
        name = family.denoiser_name
        path = _hub_snapshot(
            path,
            ["model_index.json", f"{name}/config.json", f"{name}/diffusion_pytorch_model*.safetensors*", "config.json",
             "diffusion_pytorch_model*.safetensors*"],
            ignore=["*.fp16.*", "*non_ema*"],
        )  # fmt: skip
    lora = _lora_folder(path)
    if lora is not None:
        network = copy.deepcopy(family.denoiser)
        network.load_lora_adapter(
            lora, weight_name=LORA_WEIGHT_NAME, prefix=family.denoiser_name, adapter_name="reference"
        )
        network.fuse_lora(adapter_names=["reference"])
        network.unload_lora()
        return network
    denoiser_class = type(family.denoiser)
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return denoiser_class.from_pretrained(path, subfolder=family.denoiser_name)
    if os.path.isfile(os.path.join(path, "config.json")):
        return denoiser_class.from_pretrained(path)
    raise ValueError(
        f"ref_model={path!r} is neither a LoRA folder ({LORA_WEIGHT_NAME}), a pipeline folder (model_index.json) nor a "
        f"{denoiser_class.__name__} folder (config.json)."
    )


def _is_quantized(module: nn.Module) -> bool:
    return bool(getattr(module, "is_quantized", False) or getattr(module, "hf_quantizer", None))


def _dataset_name(dataset: Any) -> str | None:
    if isinstance(dataset, (str, os.PathLike)):
        return os.fspath(dataset)
    info = getattr(dataset, "info", None)
    return getattr(info, "dataset_name", None) or None


def _per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.ndim)))


def _add_lora(denoiser: nn.Module, peft_config: Any, suggested_targets: tuple[str, ...]) -> None:
    """Add a LoRA adapter, turning peft's error for unmatched target modules into one that says what exists."""
    try:
        denoiser.add_adapter(peft_config)
    except ValueError as exc:
        if "not found" not in str(exc) and "target" not in str(exc):
            raise
        leaves = sorted({name.rsplit(".", 1)[-1] for name, m in denoiser.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"LoraConfig.target_modules={peft_config.target_modules!r} matches no module of "
            f"{type(denoiser).__name__}. Linear layers it has include: {leaves[:20]}. For this family use e.g. "
            f"{list(suggested_targets)}."
        ) from exc
