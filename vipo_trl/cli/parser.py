"""Argument parsing for the `vipo-trl` command: dataclass fields as flags, a YAML file as defaults, and errors that
suggest the closest valid name for a misspelt flag or key."""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml
from transformers import HfArgumentParser


@dataclass
class ScriptArguments:
    """What to train on."""

    model: str | None = field(
        default=None, metadata={"help": "Hub id or local folder of a diffusers pipeline (SD, SDXL, SD3, FLUX, Wan)."}
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "Hub id, a folder saved with save_to_disk, a parquet/json/csv file, or a latent cache."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str | None = field(default=None, metadata={"help": "Evaluation split, if any."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset instead of downloading it whole."})
    config: str | None = field(default=None, metadata={"help": "YAML file of defaults; command-line flags override."})


@dataclass
class LoraArguments:
    """LoRA through peft."""

    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA instead of the whole denoiser."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt; default: the model family's attention projections."}
    )

    def to_peft_config(self) -> Any:
        from peft import LoraConfig

        if not self.use_peft:
            return None
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.lora_target_modules,
            init_lora_weights="gaussian",
        )


@dataclass
class CacheArguments:
    """Where and how to write a latent cache."""

    cache_output: str | None = field(default=None, metadata={"help": "Folder to write the latent cache to."})
    shard_size: int = field(default=256, metadata={"help": "Pairs per shard file."})
    encode_batch_size: int = field(default=8, metadata={"help": "Pairs encoded at once."})


@dataclass
class EvalArguments:
    """What `vipo-trl eval` generates and scores."""

    model: str | None = field(
        default=None, metadata={"help": "Hub id or folder of the base pipeline (default: the embedded shapes model)."}
    )
    lora: str | None = field(default=None, metadata={"help": "LoRA folder or hub id to compare with the base."})
    prompts: str | None = field(
        default=None,
        metadata={
            "help": "A .txt (one prompt per line) or .json list, or a dataset (hub id, folder, parquet) whose "
            "--prompt_column to use; default: a built-in set (the scene prompts for the embedded model)."
        },
    )
    prompt_column: str = field(default="caption", metadata={"help": "Prompt column when --prompts is a dataset."})
    num_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "Seeds; one image per prompt x seed."})
    scorers: list[str] | None = field(
        default=None,
        metadata={
            "help": "Scorer names (clip, pickscore, hpsv2, imagereward, aesthetic, shapes); default: pickscore, "
            "or shapes for the embedded model."
        },
    )
    num_inference_steps: int | None = field(default=None, metadata={"help": "Sampling steps (default 30; 20)."})
    guidance_scale: float | None = field(default=None, metadata={"help": "Classifier-free guidance (default 7.5; 4)."})
    batch_size: int = field(default=8, metadata={"help": "Images generated at once."})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)."})
    output_dir: str = field(default="vipo-eval", metadata={"help": "Where results.json, grid.png, scores.png go."})
    config: str | None = field(default=None, metadata={"help": "YAML file of defaults; command-line flags override."})


@dataclass
class DiagnoseArguments:
    """What `vipo-trl diagnose` reads and how."""

    def to_config(self) -> Any:
        """The `PolyDPOConfig` that reads the set as training would (schema, columns, ties)."""
        from ..trainer import PolyDPOConfig

        names = ("dataset_schema", "prompt_column", "chosen_column", "rejected_column", "category_column", "seed")
        return PolyDPOConfig(output_dir=self.output_dir, report_to=[], **{k: getattr(self, k) for k in names})

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Hub id, save_to_disk folder or data file of a preference set, or default:clean|noisy|easy for "
            "the embedded model's synthetic sets. May also be given as the first argument."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    split: str = field(default="train", metadata={"help": "Split."})
    scorers: list[str] | None = field(
        default=None, metadata={"help": "Scorer names (default: pickscore hpsv2 imagereward aesthetic clip; shapes)."}
    )
    max_pairs: int | None = field(default=1000, metadata={"help": "Diagnose at most this many pairs (in order)."})
    easy_relevance: float = field(
        default=0.25,
        metadata={
            "help": "A pair is easy when its loser keeps at most this share of the winner's "
            "relevance to the prompt (for every scorer)."
        },
    )
    prompt_shuffles: int = field(default=2, metadata={"help": "Other prompts each image is also scored against."})
    dataset_schema: str = field(default="auto", metadata={"help": "auto, pickapic or generic."})
    prompt_column: str | None = field(default=None, metadata={"help": "Prompt column (default: caption / prompt)."})
    chosen_column: str = field(default="chosen", metadata={"help": "Chosen image column (generic schema)."})
    rejected_column: str = field(default="rejected", metadata={"help": "Rejected image column (generic schema)."})
    category_column: str | None = field(default=None, metadata={"help": "Category column: figures per category."})
    seed: int = field(default=0, metadata={"help": "Seed of the prompt shuffles (and of default:* sets)."})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)."})
    output_dir: str = field(default="vipo-diagnosis", metadata={"help": "Where diagnosis.json/.txt/.png go."})
    config: str | None = field(default=None, metadata={"help": "YAML file of defaults; command-line flags override."})


class CliError(SystemExit):
    """A usage error: printed without a traceback, exit status 2."""

    def __init__(self, message: str):
        print(f"vipo-trl: error: {message}", file=sys.stderr)
        super().__init__(2)


def _field_names(dataclass_types: list[type]) -> set[str]:
    return {f.name for t in dataclass_types for f in dataclasses.fields(t) if f.init}


def _suggest(name: str, valid: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(valid), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


class VipoArgumentParser(HfArgumentParser):
    """`HfArgumentParser` that reads `--config file.yaml` as defaults and names the closest valid field for an unknown
    flag or YAML key."""

    def __init__(self, dataclass_types: list[type], prog: str | None = None):
        self.dataclass_types_ = list(dataclass_types)
        super().__init__(self.dataclass_types_, prog=prog)

    def parse(self, argv: list[str]) -> tuple[Any, ...]:
        valid = _field_names(self.dataclass_types_)
        config_path = _find_config(argv)
        if config_path:
            try:
                with open(config_path) as f:
                    values = yaml.safe_load(f) or {}
            except OSError as exc:
                raise CliError(f"cannot read --config {config_path}: {exc}") from None
            if not isinstance(values, dict):
                raise CliError(f"{config_path} must hold a mapping of field: value.")
            unknown = [k for k in values if k not in valid]
            if unknown:
                raise CliError(f"unknown key {unknown[0]!r} in {config_path}.{_suggest(unknown[0], valid)}")
            self.set_defaults(**values)
        try:
            *parsed, remaining = self.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        except ValueError as exc:  # a config field rejected its value (e.g. beta <= 0)
            raise CliError(str(exc)) from None
        if remaining:
            flag = next((r for r in remaining if r.startswith("-")), remaining[0])
            name = flag.lstrip("-").split("=")[0].replace("-", "_")
            raise CliError(f"unrecognized argument {flag!r}.{_suggest(name, valid)}")
        return tuple(parsed)


def _find_config(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None
