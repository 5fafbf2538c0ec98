"""Checks the command line runs before any model is loaded or any step is taken: each bad input becomes one line
(`vipo-trl: error: ...`, exit status 2) that names the input and the fix, instead of a traceback minutes later."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from .parser import CliError

#: A hub id is `name` or `org/name` of letters, digits, `-`, `_` and `.`; anything else is meant as a local path.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
#: TRL's LoRA flags and the `peft.LoraConfig` field each sets (as `trl.get_peft_config` reads them).
LORA_FLAGS = {
    "lora_r": "r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "lora_target_modules": "target_modules",
    "lora_target_parameters": "target_parameters",
    "lora_modules_to_save": "modules_to_save",
    "use_rslora": "use_rslora",
    "use_dora": "use_dora",
}
LORA_FLAG_OF = {field: flag for flag, field in LORA_FLAGS.items()}


def looks_local(name: str) -> bool:
    """Whether `name` can only be a local path (not a hub id)."""
    return os.path.exists(name) or name.startswith((".", "/", "~")) or not HUB_ID.match(name)


def check_model(name: str) -> None:
    """A local model must be a diffusers pipeline folder with every component it lists, in safetensors."""
    if not looks_local(name):
        return  # a hub id: downloading (or not finding) it is the Hub's to report
    path = os.path.expanduser(name)
    if not os.path.exists(path):
        raise CliError(f"--model_name_or_path {name}: no such folder (nor is it a hub id like 'org/name').")
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise CliError(
            f"--model_name_or_path {name}: not a diffusers pipeline folder (no model_index.json). Save one with "
            "pipe.save_pretrained(folder), or name its hub id."
        )
    try:
        with open(index_file) as f:
            index = json.load(f)
    except (OSError, ValueError) as exc:
        raise CliError(f"--model_name_or_path {name}: model_index.json is unreadable ({exc}).") from None
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        folder = os.path.join(path, component)
        if not os.path.isdir(folder):
            raise CliError(
                f"--model_name_or_path {name}: model_index.json lists the component {component!r} but the folder "
                f"{folder} is missing. Copy the whole pipeline folder."
            )
        weights = [f for f in os.listdir(folder) if f.endswith(WEIGHT_SUFFIXES)]
        if weights and not any(f.endswith(".safetensors") for f in weights):
            raise CliError(
                f"--model_name_or_path {name}: {component} has only pickle weights ({', '.join(sorted(weights))}); "
                "vipo-trl loads safetensors only (a pickle can run code). Convert them with "
                "`Model.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)` where you trust "
                "the file."
            )


def check_ref_model(name: str) -> None:
    """A local reference must be a LoRA folder (an earlier round's output) or a whole pipeline folder."""
    from ..models.base import LORA_WEIGHT_NAME, check_lora_file

    if not looks_local(name):
        return
    path = os.path.expanduser(name)
    if not os.path.exists(path):
        raise CliError(f"--ref_model {name}: no such folder (nor is it a hub id like 'org/name').")
    if os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)):
        try:
            check_lora_file(path)
        except ValueError as exc:
            raise CliError(f"--ref_model {exc}") from None
        return
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise CliError(
            f"--ref_model {name}: neither a LoRA folder ({LORA_WEIGHT_NAME}, as `vipo-trl train --use_peft` saves) "
            "nor a diffusers pipeline folder (model_index.json)."
        )
    try:
        check_model(name)
    except CliError as exc:
        raise CliError(str(exc).replace("--model_name_or_path", "--ref_model", 1)) from None


def check_aligned(name: str, flag: str = "--lora") -> None:
    """`--lora` of `eval` and `pairs`, `--start_from` of `train`: a training run's output (a LoRA, or a full
    fine-tune's denoiser folder)."""
    from ..models.generation import check_aligned_weights

    try:
        check_aligned_weights(os.path.expanduser(name))
    except ValueError as exc:
        raise CliError(f"{flag} {exc}") from None


def check_dataset_name(name: str, flag: str = "--dataset_name") -> None:
    """A local dataset must exist and hold something."""
    if not looks_local(name):
        return
    path = os.path.expanduser(name)
    if not os.path.exists(path):
        raise CliError(f"{flag} {name}: no such file or folder (nor is it a hub id like 'org/name').")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise CliError(f"{flag} {name}: the file is empty.")
    if os.path.isdir(path) and not any(not f.startswith(".") for f in os.listdir(path)):
        raise CliError(f"{flag} {name}: the folder is empty.")


def check_dataset(dataset: Any, where: str, options: Any) -> None:
    """The loaded dataset has rows and the columns its schema needs (checked on the column names, before training).
    `where` names it in errors (`--dataset_name NAME`)."""
    from ..data import PreferenceDataError, is_latent_cache

    if is_latent_cache(dataset):
        return
    rows = getattr(dataset, "num_rows", None)
    if rows == 0:
        raise CliError(f"{where}: the dataset has no rows.")
    names = getattr(dataset, "column_names", None)
    if names:
        try:
            options.columns_of(names)
        except PreferenceDataError as exc:
            raise CliError(f"{where}: {exc}") from None
    if rows is None:
        return  # a stream: its rows are checked as they come
    # Labels (ties, bad values) and the first decodable pair, read now rather than after the model has loaded.
    from ..data import pairs_from_options

    try:
        pairs = pairs_from_options(dataset, options, 1)
        pairs[0]
    except PreferenceDataError as exc:
        raise CliError(f"{where}: {exc}") from None


def check_output_dir(config: Any) -> None:
    """`output_dir` must be a folder we may write, and not one that holds an earlier run we would overwrite."""
    out = config.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise CliError(f"--output_dir {out} is a file; name a folder.")
    if not os.path.isdir(out) or config.resume_from_checkpoint or config.overwrite_output_dir:
        return
    earlier = [f for f in os.listdir(out) if f.startswith("checkpoint-") or f in EARLIER_RUN_FILES]
    if earlier:
        raise CliError(
            f"--output_dir {out} holds an earlier run ({', '.join(sorted(earlier)[:3])}). Pass "
            "--overwrite_output_dir to replace it, --resume_from_checkpoint latest to continue it, or another "
            "--output_dir."
        )


EARLIER_RUN_FILES = {"poly_dpo_config.json", "pytorch_lora_weights.safetensors", "diffusion_pytorch_model.safetensors"}


def check_resume(config: Any, peft_config: Any = None, start_from: Any = None, ref_model: Any = None) -> None:
    """`--resume_from_checkpoint` names a complete checkpoint (or `latest`/`true` with one in output_dir) made with
    the same LoRA settings, on top of the same `--start_from` runs and against the same `--ref_model`."""
    from ..trainer.poly_dpo_trainer import last_complete_checkpoint

    resume = config.resume_from_checkpoint
    if resume in (None, "", False):
        return
    if str(resume).lower() in ("latest", "true"):
        resume = last_complete_checkpoint(config.output_dir)
        if resume is None:
            raise CliError(
                f"--resume_from_checkpoint {config.resume_from_checkpoint}: {config.output_dir} holds no complete "
                "checkpoint-N folder."
            )
        _check_lora_settings(resume, peft_config)
        _check_same_start_and_reference(resume, start_from, ref_model)
        return
    if not os.path.isdir(resume):
        raise CliError(f"--resume_from_checkpoint {resume}: no such folder (or pass 'latest').")
    if not os.path.isfile(os.path.join(resume, "trainer_state.json")):
        raise CliError(
            f"--resume_from_checkpoint {resume}: not a complete checkpoint (no trainer_state.json); a kill may have "
            "cut it short. Pass 'latest' to take the last complete one."
        )
    try:
        with open(os.path.join(resume, "trainer_state.json")) as f:
            json.load(f)
    except ValueError:
        raise CliError(f"--resume_from_checkpoint {resume}: its trainer_state.json is damaged.") from None
    _check_lora_settings(resume, peft_config)
    _check_same_start_and_reference(resume, start_from, ref_model)


def check_reference_base(ref_model: str | None, start_from: list[str] | None) -> None:
    """A LoRA --ref_model trained on top of other runs needs them as --start_from too (the trainer's rule,
    `check_reference_lora_base`), refused before the model loads."""
    from ..models.base import LORA_WEIGHT_NAME
    from ..models.generation import fusion_chain
    from ..trainer.poly_dpo_trainer import check_reference_lora_base

    path = os.path.expanduser(ref_model or "")
    if not ref_model or not os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)):
        return  # none, a pipeline, or a hub id (the trainer checks what it fetches)
    try:
        chain = fusion_chain([os.path.expanduser(w) for w in start_from or []])
    except ValueError:
        return  # a bad --start_from is reported by its own check
    try:
        check_reference_lora_base(path, chain, flags=True)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _check_same_start_and_reference(checkpoint: str, start_from: Any, ref_model: Any) -> None:
    """What the trainer would refuse once the model is loaded (`resume_mismatch`), refused before."""
    from ..models.generation import fusion_chain
    from ..trainer.poly_dpo_trainer import reference_name, resume_mismatch

    try:
        chain = fusion_chain([os.path.expanduser(w) for w in start_from or []])
    except ValueError:
        return  # a bad --start_from is reported by its own check
    problem = resume_mismatch(checkpoint, chain, reference_name(ref_model))
    if problem:
        raise CliError(f"--resume_from_checkpoint {problem}")


def _check_lora_settings(checkpoint: str, peft_config: Any) -> None:
    """The checkpoint's LoRA was made with this run's rank, alpha, DoRA and rsLoRA (what its metadata records): a
    resume with others would fail to load it, or, for DoRA, start its magnitudes afresh without a word."""
    from ..models.base import LORA_WEIGHT_NAME

    path = os.path.join(checkpoint, LORA_WEIGHT_NAME)
    if peft_config is None or not os.path.isfile(path):
        return
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    for field in ("r", "lora_alpha", "use_dora", "use_rslora"):
        saved = {v for k, v in metadata.items() if k.endswith("." + field)}
        value = getattr(peft_config, field)
        if saved and saved != {value}:
            flag, name = LORA_FLAG_OF[field], "rank" if field == "r" else field
            raise CliError(
                f"--resume_from_checkpoint {checkpoint}: its LoRA has {name} {sorted(saved)[0]}, this run --{flag} "
                f"{value}. Resume with the same --{flag}, or start a new run."
            )
