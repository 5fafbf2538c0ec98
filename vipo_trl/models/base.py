"""`DiffusionFamily`: what the trainer needs to know about one model family."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from diffusers.configuration_utils import FrozenDict
from diffusers.utils import convert_unet_state_dict_to_peft
from diffusers.utils.torch_utils import randn_tensor
from peft import set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers.utils import logging

from .options import DiffusionOptions

logger = logging.get_logger(__name__)
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: The weights file of a denoiser saved whole with `save_pretrained` (a full fine-tune).
DENOISER_WEIGHT_NAME = "diffusion_pytorch_model.safetensors"
#: The attribute of a pipeline listing the training runs fused into it, in order: `(weights, "lora" | "denoiser")`.
FUSED_RUNS_ATTRIBUTE = "vipo_trl_fused_runs"


class DiffusionFamily(ABC):
    """One model family (SD 1.x/2.x, SDXL, SD3, FLUX, Wan) seen through the few operations preference training needs.

    A family wraps its official diffusers pipeline: it keeps the frozen parts (VAE, text encoders), the
    trainable `denoiser` (UNet or transformer) and a training noise scheduler. The trainer never branches on the
    family: it encodes with `encode_images`/`encode_conditioning`, noises with `sample_timesteps` and
    `noisy_input_and_target`, and predicts with `predict`. Prompts are encoded with the pipeline's own
    `encode_prompt`, so training sees exactly the conditioning that inference builds. Families register themselves
    for the `_class_name` values of `model_index.json` they handle (`vipo_trl.models.register_family`).
    """

    #: The official pipeline class, used to load the model and to save/load LoRA weights.
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    #: `model_index.json` `_class_name` values this family handles.
    pipeline_class_names: ClassVar[tuple[str, ...]] = ()
    #: Attribute of the pipeline holding the trainable network ("unet" or "transformer").
    denoiser_name: ClassVar[str] = "unet"
    #: Frozen pipeline components moved to the training device.
    frozen_component_names: ClassVar[tuple[str, ...]] = ("vae", "text_encoder")
    #: Tokenizers of the text encoders (not loaded when training from a latent cache).
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    #: `beta` used when `PolyDPOConfig.beta` is None, in the `-0.5 * beta` convention (see docs/model_families.md).
    recommended_beta: ClassVar[float] = 2000.0
    #: Used when `DiffusionOptions.timestep_sampling` is None.
    default_timestep_sampling: ClassVar[str] = "uniform"
    #: Suggested `LoraConfig.target_modules`, quoted in errors and docs.
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    #: Image sides must be multiples of this for aspect-ratio buckets (VAE factor times the denoiser's downsampling).
    bucket_divisibility: ClassVar[int] = 64
    #: Whether pixel inputs are videos `[B, 3, F, H, W]` rather than images `[B, 3, H, W]`.
    is_video: ClassVar[bool] = False

    def __init__(self, pipeline: DiffusionPipeline, options: DiffusionOptions | None = None, vae_config: Any = None):
        self.pipeline = pipeline
        self.options = options or DiffusionOptions()
        self.denoiser: nn.Module = getattr(pipeline, self.denoiser_name)
        # Kept apart from the VAE so a cache-only family (no VAE loaded) still scales latents correctly.
        self.vae_config = vae_config if vae_config is not None else pipeline.vae.config
        for module in self.frozen_modules.values():
            module.requires_grad_(False).eval()
        self.device = torch.device("cpu")
        self.name_or_path: str | None = None

    @property
    def fused_runs(self) -> list[tuple[str, str]]:
        """The training runs fused into this model's weights (`generation.fuse_aligned_weights`), in order:
        `(weights, "lora" | "denoiser")`."""
        return list(getattr(self.pipeline, FUSED_RUNS_ATTRIBUTE, []))

    @property
    def native_resolution(self) -> int | None:
        """The image side the denoiser was built for: its config's `sample_size` (latent pixels) times the VAE's
        downsampling; `None` when the configs do not say (FLUX, Wan)."""
        size = getattr(self.denoiser.config, "sample_size", None)
        channels = getattr(self.vae_config, "block_out_channels", None)
        if not isinstance(size, int) or not channels:
            return None
        return size * 2 ** (len(channels) - 1)

    def warn_if_far_from_native(self, resolution: int) -> None:
        """Warn when `resolution` is under half or over twice `native_resolution`: SDXL trained at 512 px learns off
        its scale, and a 32 px model trained at the default 512 px upscales every image at 256x the cost."""
        native = self.native_resolution
        if native is None or native / 2 <= resolution <= 2 * native:
            return
        effect = (
            f"every image is upscaled and each step costs about {(resolution / native) ** 2:.0f}x the compute at the "
            "native size"
            if resolution > native
            else "the model learns at a scale it does not generate at"
        )
        logger.warning(
            "resolution=%s, but %s was built for %s px images (its denoiser's sample_size times the VAE's "
            "downsampling): %s. Set resolution=%s (--resolution) unless this is intended.",
            resolution, type(self).__name__, native, effect, native,
        )  # fmt: skip

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        revision: str | None = None,
        variant: str | None = None,
        frozen_dtype: torch.dtype = torch.float32,
        options: DiffusionOptions | None = None,
        encoders: bool = True,
        quantization_config: Any = None,
    ) -> DiffusionFamily:
        """Load the official pipeline from a hub id or local folder: the denoiser in float32 (trainable), everything
        else in `frozen_dtype`, but the VAE in float32 when `frozen_dtype` is float16 (the SD VAEs overflow there;
        bfloat16 has float32's range, and a float32 VAE costs GPU time every step, benchmarks/RESULTS.md). With
        `encoders=False` (training from a latent cache) the VAE, text encoders and tokenizers are not loaded at all.
        With `quantization_config` (a diffusers or transformers `BitsAndBytesConfig`) the denoiser is loaded quantized,
        computing in `frozen_dtype` (QLoRA)."""
        options = options or DiffusionOptions()
        vae_dtype = torch.float32 if frozen_dtype == torch.float16 else frozen_dtype
        dtype = {"default": frozen_dtype, cls.denoiser_name: torch.float32, "vae": vae_dtype}
        kwargs = cls.pipeline_load_kwargs(options)
        if quantization_config is not None:
            kwargs[cls.denoiser_name] = cls.load_quantized_denoiser(
                name_or_path, quantization_config, revision=revision, variant=variant, dtype=frozen_dtype
            )
        vae_config = None
        if not encoders:
            kwargs.update({name: None for name in (*cls.frozen_component_names, *cls.tokenizer_names)})
            vae_class = cls.pipeline_class._get_signature_types()["vae"][0]
            vae_config = vae_class.load_config(name_or_path, subfolder="vae", revision=revision)
            vae_config = FrozenDict(vae_config)
        pipeline = cls.pipeline_class.from_pretrained(
            name_or_path, revision=revision, variant=variant, dtype=dtype, **kwargs
        )
        family = cls(pipeline, options, vae_config=vae_config)
        family.name_or_path = str(name_or_path)
        return family

    @classmethod
    def load_quantized_denoiser(
        cls, name_or_path: str, quantization_config: Any, *, revision: str | None, variant: str | None, dtype: Any
    ) -> nn.Module:
        """The denoiser alone, loaded in 4 or 8 bits through diffusers' bitsandbytes quantizer."""
        from diffusers import BitsAndBytesConfig

        if not isinstance(quantization_config, BitsAndBytesConfig):  # e.g. trl.get_quantization_config's
            settings = {k: v for k, v in quantization_config.to_dict().items() if not k.startswith("_")}
            settings.pop("quant_method", None)
            quantization_config = BitsAndBytesConfig(**settings)
        if not torch.cuda.is_available():
            raise RuntimeError(
                "quantization_config (QLoRA) needs a CUDA GPU: diffusers' bitsandbytes quantizer does not run on the "
                "CPU. Train without quantization here, or on a GPU machine."
            )
        denoiser_class = cls.pipeline_class._get_signature_types()[cls.denoiser_name][0]
        return denoiser_class.from_pretrained(
            name_or_path,
            subfolder=cls.denoiser_name,
            revision=revision,
            variant=variant,
            quantization_config=quantization_config,
            torch_dtype=dtype,
        )

    @classmethod
    def pipeline_load_kwargs(cls, options: DiffusionOptions) -> dict[str, Any]:
        """Extra `from_pretrained` arguments (e.g. components not to load)."""
        return {}

    @property
    def frozen_modules(self) -> dict[str, nn.Module]:
        """The frozen networks (VAE, text encoders) by name."""
        modules = {name: getattr(self.pipeline, name, None) for name in self.frozen_component_names}
        return {name: m for name, m in modules.items() if m is not None}

    @property
    def vae(self) -> nn.Module:
        if self.pipeline.vae is None:
            raise RuntimeError("This family was loaded for training from a latent cache, without its VAE.")
        return self.pipeline.vae

    def to(self, device: torch.device | str) -> DiffusionFamily:
        """Move the frozen networks to `device` (the Trainer places the denoiser)."""
        self.device = torch.device(device)
        for module in self.frozen_modules.values():
            module.to(self.device)
        return self

    # ---------------------------------------------------------------- the training step

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The prompt embeddings the denoiser reads, with the pipeline's own `encode_prompt`: a dict of tensors whose
        first dimension is `len(prompts)`. Called without gradients. A family of your own implements this, or
        `encode_conditioning` alone (then `proportion_empty_prompts` is not available to it)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement encode_prompts, which encode_conditioning's default and "
            "proportion_empty_prompts (to encode the empty prompt) need: implement it (a family that overrides "
            "encode_conditioning instead trains with proportion_empty_prompts=0)."
        )

    def encode_conditioning(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Conditioning of each pair, from the collated batch (`prompts`, `original_sizes`, `crop_top_lefts`,
        `pixel_values_chosen`): a dict of tensors whose first dimension is the number of pairs B. The trainer repeats
        it for the pair layout `[chosen..., rejected...]`; a latent cache stores it. Called without gradients. The
        prompt embeddings, unless the family also conditions on the image's size (SDXL)."""
        return self.encode_prompts(batch["prompts"])

    def empty_prompt_conditioning(self) -> dict[str, torch.Tensor]:
        """What the pipeline's classifier-free guidance conditions on for no prompt (one row, the `encode_prompts`
        keys): the pairs `proportion_empty_prompts` draws train on it, so guidance keeps an unconditional prediction
        to steer from. The encoded empty prompt, unless the pipeline uses zeros there (SDXL)."""
        return self.encode_prompts([""])

    @torch.no_grad()
    def encode_latent_distribution(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the VAE's latent distribution (VAE units, float32). This is what a latent
        cache stores, so sampling at training time stays as faithful as encoding on the fly."""
        dist = self.vae.encode(pixel_values.to(self.device, self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def latents_from_distribution(
        self, mean: torch.Tensor, std: torch.Tensor, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """Sample `i` draws its latent with `generators[i]` (so it depends on its own seed only), then is scaled as the
        denoiser expects (`normalize_latents`)."""
        return self.normalize_latents(mean + std * randn_like_rows(mean, generators))

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents to the denoiser's scale. Default: a KL VAE with `scaling_factor` and optional `shift_factor`."""
        shift = getattr(self.vae_config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae_config.scaling_factor

    def encode_images(self, pixel_values: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Latents of images in [-1, 1], one generator per image."""
        return self.latents_from_distribution(*self.encode_latent_distribution(pixel_values), generators)

    @abstractmethod
    def sample_timesteps(self, generators: list[torch.Generator]) -> torch.Tensor:
        """One training timestep per generator (on the CPU)."""

    @abstractmethod
    def noisy_input_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's input at `timesteps` and the target its prediction is regressed on."""

    def error_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weights of the squared error (SD3-style loss weighting), or None for uniform weights."""
        return None

    @abstractmethod
    def predict(
        self,
        network: nn.Module,
        noisy_input: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Run `network` (the policy, possibly wrapped for DDP, or the reference) with inputs cast to `dtype`; the
        output has the latents' shape."""

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the denoiser's activations in the backward pass."""
        self.denoiser.enable_gradient_checkpointing()

    # ---------------------------------------------------------------- LoRA files

    def lora_state_dict_for_saving(
        self, denoiser: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The denoiser's LoRA weights under peft's keys, which every family's `load_lora_weights` reads; taken from
        `state_dict` (the denoiser's full state dict) when given, as it is under FSDP, where the module holds shards."""
        return get_peft_model_state_dict(denoiser, state_dict=state_dict)

    def lora_state_dict_for_loading(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A saved file's keys (prefix removed) as peft's."""
        return state

    def save_lora(
        self, save_directory: str, denoiser: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write the LoRA as `pytorch_lora_weights.safetensors` in the family's diffusers format, with its
        `LoraConfig` as metadata, loadable by the pipeline's `load_lora_weights`. `state_dict`: as in
        `lora_state_dict_for_saving`.

        The metadata says `lora_dropout` 0 whatever the run trained with: dropout is a training-time setting, and
        `load_lora_weights` builds the adapter from this metadata with its dropout in training mode even in a
        pipeline in eval mode, so a file saying 0.05 (TRL's default) samples with dropout on: another image from the
        same seed each time."""
        name = self.denoiser_name
        metadata = {**denoiser.peft_config["default"].to_dict(), "lora_dropout": 0.0}
        self.pipeline_class.save_lora_weights(
            save_directory,
            weight_name=LORA_WEIGHT_NAME,
            **{
                f"{name}_lora_layers": self.lora_state_dict_for_saving(denoiser, state_dict),
                f"{name}_lora_adapter_metadata": metadata,
            },
        )

    def load_lora(self, directory: str, denoiser: nn.Module) -> None:
        """Load a LoRA written by `save_lora` into the denoiser's (already added) LoRA adapter."""
        prefix = self.denoiser_name + "."
        state = load_file(os.path.join(directory, LORA_WEIGHT_NAME))
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(denoiser, self.lora_state_dict_for_loading(state), adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        # Only this adapter's tensors count: a frozen reference LoRA beside it (`ref_model`) is not in the file.
        missing = [k for k in getattr(result, "missing_keys", None) or [] if "lora_" in k and ".default." in k]
        if unexpected or missing:  # e.g. another rank, targets or DoRA setting (a missing magnitude would start afresh)
            keys = f"unexpected keys {unexpected[:5]}" if unexpected else f"LoRA tensors it lacks {missing[:5]}"
            raise ValueError(
                f"The LoRA in {directory} does not fit this model's LoRA ({keys}): load it with the LoraConfig it was "
                "trained with (rank, target modules, use_dora)."
            )

    def sequence_length_kwargs(self) -> dict[str, int]:
        """`max_sequence_length` for pipelines whose `encode_prompt` takes it (T5/UMT5 encoders)."""
        n = self.options.max_sequence_length
        return {} if n is None else {"max_sequence_length": n}

    def describe(self) -> dict[str, Any]:
        """A few facts for logs and model cards."""
        return {"family": type(self).__name__, "pipeline": self.pipeline_class.__name__}


class UNetLoraKeys:
    """Mixin for the UNet families (SD 1.x/2.x, SDXL): a LoRA file may hold diffusers' older UNet key format
    (`to_q.lora.down`, written by diffusers' UNet training scripts and by earlier vipo-trl builds), read as peft's.
    Files are written in peft's keys, as for every family: the older format names only the attention projections, so
    a LoRA on other layers too (`all-linear`, feed-forward, convolutions) came out half in each format, and
    `load_lora_weights` then dropped the attention layers with a warning."""

    def lora_state_dict_for_loading(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return convert_unet_state_dict_to_peft(state)


def check_lora_file(directory: str) -> None:
    """Refuse a LoRA file whose keys mix diffusers' older UNet format with peft's, as earlier builds wrote a LoRA on
    more than the attention projections: `load_lora_weights` would load it only in part, without an error."""
    from safetensors import safe_open

    path = os.path.join(directory, LORA_WEIGHT_NAME)
    if not os.path.isfile(path):
        return
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    older = any(".lora.down." in k or ".lora.up." in k for k in keys)
    if older and any(".lora_A." in k or ".lora_B." in k for k in keys):
        raise ValueError(
            f"{directory}: its LoRA mixes two key formats (written by a vipo-trl build before 2026-12-06 for a LoRA on "
            "more than the attention projections), which `load_lora_weights` loads only in part. Save it again: "
            "resume its run from one of its checkpoints (docs/troubleshooting.md)."
        )


def check_lora_config(peft_config: Any, field_name: Callable[[str], str] = "LoraConfig.{}".format) -> None:
    """Refuse a peft config whose trained weights a pipeline's `load_lora_weights` cannot load, before any training:
    it loads LoRA layers (DoRA, rsLoRA and `lora_bias` included), not other adapter types, whole modules or the base
    layers' biases, and a file holding those is refused by it only after the hours of training. `field_name` names a
    field in the message (the command line names its flags)."""
    from peft import LoraConfig

    if not isinstance(peft_config, LoraConfig):
        raise ValueError(
            f"peft_config is a {type(peft_config).__name__}: pipelines load only LoRA weights "
            "(`pipe.load_lora_weights`). Pass a peft.LoraConfig (use_dora=True gives DoRA)."
        )
    if not isinstance(peft_config.r, int) or peft_config.r < 1:
        raise ValueError(f"{field_name('r')}={peft_config.r!r}: the LoRA rank must be a positive integer, e.g. 16.")
    unloadable = {
        "modules_to_save": "train those modules with LoRA instead (add them to the target modules)",
        "target_parameters": "target the modules that hold those parameters instead",
    }
    for name, fix in unloadable.items():
        if getattr(peft_config, name, None):
            raise ValueError(
                f"{field_name(name)}={getattr(peft_config, name)!r}: `load_lora_weights` cannot load what it trains, "
                f"so the saved LoRA would not load into the pipeline. Leave it unset; {fix}."
            )
    init = peft_config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "loftq", "corda")):
        raise ValueError(
            f"{field_name('init_lora_weights')}={init!r} rewrites the base weights when the LoRA is created: the "
            "reference (the network with its adapters disabled) would no longer be the base model, and the saved "
            "LoRA would not fit the base a pipeline loads. Use True (peft's default) or 'gaussian'."
        )
    if peft_config.bias != "none":
        raise ValueError(
            f"{field_name('bias')}={peft_config.bias!r} trains the base layers' biases, which `load_lora_weights` "
            "cannot load. Use bias='none' (lora_bias=True gives the LoRA layers a bias of their own, which loads)."
        )


def save_gathered_weights(denoiser: nn.Module, state_dict: dict[str, torch.Tensor], directory: str) -> None:
    """Write a fully fine-tuned denoiser as its `save_pretrained` would (config, `diffusion_pytorch_model*.safetensors`
    shards of at most 10 GB with an index), but from `state_dict`: the weights gathered from every rank under FSDP or
    DeepSpeed, where the module itself holds only this rank's shards."""
    from huggingface_hub import save_torch_state_dict

    denoiser.save_config(directory)
    pattern = "diffusion_pytorch_model{suffix}.safetensors"
    save_torch_state_dict(state_dict, directory, filename_pattern=pattern, max_shard_size="10GB")


def randn_like_rows(reference: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Standard normal noise of `reference`'s shape, row `i` drawn on the CPU from `generators[i]` (diffusers'
    `randn_tensor` with one generator per row), so a row's noise depends on its own seed only."""
    if len(generators) != reference.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {reference.shape[0]}")
    noise = randn_tensor(reference.shape, generator=generators, device=torch.device("cpu"), dtype=torch.float32)
    return to_device(noise, reference.device, reference.dtype)


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor made on the CPU during a step (noise, timesteps, SDXL's time ids), copied to `device` without making
    the host wait for the GPU: a blocking copy synchronises the stream mid-step, leaving the GPU idle while Python
    launches what follows. Safe host to device: the source is staged before the call returns."""
    return tensor.to(device, dtype, non_blocking=True)
