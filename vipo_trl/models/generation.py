"""Sampling from a pipeline with one seeded generator per image: the one generation helper behind evaluation, the
embedded default's synthetic sets and the training callback; and loading a training run's output (a LoRA or a full
fine-tune's denoiser) into a pipeline to sample from it."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from .base import FUSED_RUNS_ATTRIBUTE


def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    batch_size: int = 8,
    progress: str | None = None,
    **pipeline_kwargs: Any,
) -> list[Any]:
    """One image per (prompt, seed); each image's noise comes from its own seeded generator, so base and aligned
    pipelines start from the same noise. `progress` titles a progress bar over the images. A video pipeline (Wan)
    gives one list of frames per (prompt, seed) instead. `pipeline_kwargs` go to every call (e.g. `height`,
    `num_frames`)."""
    from tqdm.auto import tqdm

    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    bar = tqdm(total=len(prompts), desc=progress, unit="image", disable=progress is None, leave=False)
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[chunk]]
        out = pipe(
            list(prompts[chunk]),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="pil",
            **pipeline_kwargs,
        )
        if hasattr(out, "frames"):  # a video pipeline: one list of PIL frames per sample
            samples = [list(frames) for frames in out.frames]
        elif hasattr(out, "images"):
            samples = list(out.images)
        else:
            raise ValueError(f"{type(pipe).__name__} returns neither images nor frames; it cannot be sampled here.")
        images += samples
        bar.update(len(samples))
    bar.close()
    return images


#: Space for row names on the left and prompt captions above the tiles of `labelled_grid`.
LABEL_WIDTH, CAPTION_HEIGHT = 64, 30


def labelled_grid(rows: dict[str, list[Image.Image]], captions: Sequence[str] = (), cell: int = 96) -> Image.Image:
    """Rows of images named on the left (e.g. "base", "aligned"), columns captioned with their prompts (wrapped to
    two lines) above; small images are enlarged without smoothing."""
    from PIL import ImageDraw

    width = LABEL_WIDTH + cell * max(len(images) for images in rows.values())
    grid = Image.new("RGB", (width, CAPTION_HEIGHT + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(4, cell // 6)  # the default bitmap font is about 6 px per character
    for x, caption in enumerate(captions):
        lines = textwrap.wrap(caption, chars)[:2]  # at word boundaries
        for line, text in enumerate(lines):
            draw.text((LABEL_WIDTH + x * cell + 2, 2 + 13 * line), text, fill="black")
    for y, (label, images) in enumerate(rows.items()):
        top = CAPTION_HEIGHT + y * cell
        draw.text((4, top + cell // 2 - 6), label, fill="black")
        for x, image in enumerate(images):
            resample = Image.NEAREST if image.width < cell else Image.BICUBIC
            grid.paste(image.convert("RGB").resize((cell, cell), resample), (LABEL_WIDTH + x * cell, top))
    return grid


def check_aligned_weights(weights: str, pipe: Any = None) -> str:
    """What a training run's output `weights` holds: `"lora"` (a LoRA folder, or a hub id, which only loading can
    check) or `"denoiser"` (the folder of a full fine-tune's denoiser; with `pipe`, of the class of `pipe`'s). Raises
    a `ValueError` naming what was looked for when it holds neither or the wrong class, before anything is
    generated."""
    from .base import DENOISER_WEIGHT_NAME, LORA_WEIGHT_NAME, check_lora_file

    if not os.path.isdir(weights):
        if os.path.exists(weights) or weights.startswith((".", "/", "~")):
            raise ValueError(f"{weights}: not a folder; name a training run's output folder or a hub id.")
        return "lora"
    names = set(os.listdir(weights))
    if LORA_WEIGHT_NAME in names:
        check_lora_file(weights)
        return "lora"
    if not ("config.json" in names and names & {DENOISER_WEIGHT_NAME, DENOISER_WEIGHT_NAME + ".index.json"}):
        raise ValueError(
            f"{weights}: holds neither a LoRA ({LORA_WEIGHT_NAME}) nor a fine-tuned denoiser (config.json and "
            f"{DENOISER_WEIGHT_NAME}), which `vipo-trl train` saves with and without --use_peft."
        )
    if pipe is not None:
        name, base = _denoiser_of(pipe)
        with open(os.path.join(weights, "config.json")) as f:
            saved_class = json.load(f).get("_class_name")
        if saved_class != type(base).__name__:
            raise ValueError(
                f"{weights}: holds class {saved_class}, but the {name} of this {type(pipe).__name__} is class "
                f"{type(base).__name__}; compare a fine-tune with the base model it was trained from."
            )
    return "denoiser"


def load_aligned_weights(pipe: Any, weights: str) -> Any:
    """Put a training run's output into `pipe` and return it: a LoRA with `pipe.load_lora_weights`, or a full
    fine-tune's denoiser in place of the pipeline's own (same class, dtype and device). A LoRA trained on top of
    earlier runs (`start_from`, recorded in its `vipo_trl_model.json`) has those fused in first, as it was trained."""
    if check_aligned_weights(weights, pipe) == "lora":
        for earlier, _ in started_from(weights):
            _fuse_one(pipe, earlier)
        _load_lora(pipe, weights)
        # A LoRA file whose metadata names a dropout (another trainer's, or this one's before 2026-12-08) is built
        # with it in training mode even in an eval-mode pipeline: sampling would drop activations at random.
        _denoiser_of(pipe)[1].eval()
        return pipe
    name, base = _denoiser_of(pipe)
    tuned = type(base).from_pretrained(weights, torch_dtype=base.dtype, use_safetensors=True).to(base.device)
    pipe.register_modules(**{name: tuned})
    return pipe


def swap_in_aligned_weights(pipe: Any, weights: str) -> Callable[[], None]:
    """`load_aligned_weights`, returning what takes the weights out again (the LoRA unloaded and any earlier run it
    was trained on top of taken out, or the pipeline's own denoiser put back), so one loaded pipeline can generate
    with two training runs' outputs in turn."""
    name, base = _denoiser_of(pipe)
    if check_aligned_weights(weights, pipe) == "lora":
        fused_before = getattr(pipe, FUSED_RUNS_ATTRIBUTE, [])
        # Fusing changes the weights in place: a copy (on the CPU) to put back, only when there is one to fuse.
        saved = {k: v.to("cpu", copy=True) for k, v in base.state_dict().items()} if started_from(weights) else None
        load_aligned_weights(pipe, weights)

        def take_out() -> None:
            pipe.unload_lora_weights()
            if saved is not None:  # (an earlier run may also have put its own denoiser in place)
                base.load_state_dict(saved)
                pipe.register_modules(**{name: base})
                setattr(pipe, FUSED_RUNS_ATTRIBUTE, fused_before)

        return take_out
    load_aligned_weights(pipe, weights)
    return lambda: pipe.register_modules(**{name: base})


def started_from(weights: str) -> list[tuple[str, str]]:
    """The earlier runs a training run's output was trained on top of, in the order they were fused (`start_from`,
    as its `vipo_trl_model.json` records them); empty for a run that started from the base. For a hub id, the repo's
    `vipo_trl_model.json` is read and the runs are named as they were published (`started_from_published`): the
    folders on the trainer's disk are not on this machine."""
    if os.path.isdir(weights):
        path = os.path.join(weights, "vipo_trl_model.json")
        if not os.path.isfile(path):
            return []
        with open(path) as f:
            return [(str(w), str(kind)) for w, kind in json.load(f).get("started_from") or []]
    path = _hub_file(weights, "vipo_trl_model.json")
    if path is None:  # not trained by vipo-trl: nothing recorded
        return []
    with open(path) as f:
        described = json.load(f)
    runs = [
        (str(w), str(kind)) for w, kind in described.get("started_from_published", described.get("started_from")) or []
    ]
    missing = [w for w, _ in runs if os.path.isabs(w) and not os.path.exists(w)]
    if missing:
        raise ValueError(
            f"{weights} was trained on top of {', '.join(missing)}, a folder on the disk it was trained on that was "
            "never pushed to the Hub: loading it alone would give another model. Push that run and train this one "
            "again from the pushed repo, or load from the folders themselves."
        )
    return runs


def _hub_file(repo_id: str, filename: str) -> str | None:
    """`filename` of Hub repo `repo_id`, downloaded (or from the Hub cache); None when the repo has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        return hf_hub_download(repo_id, filename)
    except EntryNotFoundError:  # (offline, a file not in the Hub cache reads the same)
        return None
    except RepositoryNotFoundError:
        raise ValueError(
            f"{repo_id}: no such folder here, and no such repo on the Hub that this machine may read (a private or "
            "gated repo needs `hf auth login`)."
        ) from None


def _load_lora(pipe: Any, weights: str, **kwargs: Any) -> None:
    """`pipe.load_lora_weights(weights)`; a Hub repo holding the file vipo-trl saves is read by that name, which
    diffusers then also finds in the Hub cache offline (without a name it refuses there)."""
    from .base import LORA_WEIGHT_NAME

    if not os.path.isdir(weights) and _hub_file(weights, LORA_WEIGHT_NAME) is not None:
        kwargs["weight_name"] = LORA_WEIGHT_NAME
    pipe.load_lora_weights(weights, **kwargs)


def published_name(weights: str) -> str:
    """The name a training run's output is loaded by elsewhere: the Hub repo it was pushed to, when its
    `vipo_trl_model.json` records one (`hub_model_id`, written by a run with `push_to_hub`), else `weights` itself."""
    path = os.path.join(weights, "vipo_trl_model.json")
    if not os.path.isfile(path):
        return weights
    with open(path) as f:
        return json.load(f).get("hub_model_id") or weights


def fuse_aligned_weights(pipe: Any, weights: str) -> Any:
    """Make a training run's output part of `pipe`'s own weights and return `pipe`: a LoRA fused into the denoiser
    (then unloaded: no adapter is left), or a full fine-tune's denoiser in place of the pipeline's own; a LoRA that
    was itself trained on top of earlier runs has those fused first. Training on the result starts from that model,
    and with LoRA takes it as the reference (the network with the new adapters off). The runs are recorded on the
    pipeline (`vipo_trl_fused_runs`) for the model card's loading code and the next run's `vipo_trl_model.json`."""
    if check_aligned_weights(weights, pipe) == "lora":
        for earlier, _ in started_from(weights):
            _fuse_one(pipe, earlier)
    return _fuse_one(pipe, weights)


def fusion_chain(weights: Sequence[str]) -> list[tuple[str, str]]:
    """What fusing `weights` in order records (`fuse_aligned_weights`): each LoRA's own recorded starts, then it,
    a local folder by its absolute path. Read from the folders alone, before any model is loaded."""
    chain: list[tuple[str, str]] = []
    for each in weights:
        kind = check_aligned_weights(each)
        chain += started_from(each) if kind == "lora" else []
        chain.append((_recorded_name(each), kind))
    return chain


def _recorded_name(weights: str) -> str:
    # A local folder by its absolute path, so a later `eval` or `--start_from` elsewhere still finds it.
    return os.path.abspath(weights) if os.path.isdir(weights) else str(weights)


def _fuse_one(pipe: Any, weights: str) -> Any:
    kind = check_aligned_weights(weights, pipe)
    name, denoiser = _denoiser_of(pipe)
    if kind == "lora":
        if getattr(denoiser, "is_quantized", False) or getattr(denoiser, "hf_quantizer", None):
            raise ValueError(
                f"{weights}: a LoRA cannot be fused into a {name} loaded in 4/8 bits; fuse it into the full-precision "
                "model, save that pipeline, and quantize the saved one."
            )
        _load_lora(pipe, weights, adapter_name="fused")
        pipe.fuse_lora(components=[name], adapter_names=["fused"])
        pipe.unload_lora_weights()
    else:
        load_aligned_weights(pipe, weights)
    setattr(pipe, FUSED_RUNS_ATTRIBUTE, [*getattr(pipe, FUSED_RUNS_ATTRIBUTE, []), (_recorded_name(weights), kind)])
    return pipe


def _denoiser_of(pipe: Any) -> tuple[str, Any]:
    from .registry import family_for_pipeline

    name = family_for_pipeline(type(pipe).__name__).denoiser_name
    return name, getattr(pipe, name)
