"""Argument parsing for the `vipo-trl` command, on `trl.TrlParser`: dataclass fields as flags with TRL's names
(`trl.ScriptArguments`, `trl.ModelConfig`), `--config file.yaml` as defaults (with its `env:` section), and one-line
errors that suggest the closest valid name for a misspelt flag or key."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from trl import TrlParser

from ..utils import did_you_mean


@dataclass
class TrainArguments:
    """`vipo-trl train` flags beyond TRL's script and model flags."""

    ref_model: str | None = field(
        default=None,
        metadata={
            "help": "The reference model, as PolyDPOTrainer's ref_model: a LoRA folder of an earlier round (kept as a "
            "frozen adapter of the same network), or a pipeline folder or hub id; default: the base model (with "
            "LoRA, the network with its adapters off)."
        },
    )
    start_from: list[str] | None = field(
        default=None,
        metadata={
            "help": "Earlier runs' outputs (a LoRA folder or hub id, or a full fine-tune's folder), fused into the "
            "base in order before training: the policy starts from that model and, unless --ref_model names "
            "another, it is the reference too. The second stage of SFT-then-Poly-DPO (train --loss_type sft, then "
            "--start_from that run), or a round that continues the last."
        },
    )
    reward_scorers: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward scorers (e.g. pickscore) that score the images the model being trained draws for "
            "--validation_prompts, at the start and every --validation_steps (vipo_trl.eval.RewardEvalCallback): "
            "logs reward/<scorer> and its win rate over the start. A curve from a few prompts is noisy; vipo-trl eval "
            "gives the verdict."
        },
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

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or folder of the base pipeline (default: the embedded shapes model)."}
    )
    lora: str | None = field(
        default=None,
        metadata={
            "help": "A training run's output to compare with the base: a LoRA folder or hub id, or the folder of a "
            "full fine-tune (its denoiser replaces the base's)."
        },
    )
    baseline: str | None = field(
        default=None,
        metadata={
            "help": "Another training run's output to compare --lora with instead of the base (e.g. a Diffusion-DPO "
            "run against a Poly-DPO run): same prompts and seeds, win rate of --lora over it."
        },
    )
    prompts: str | None = field(
        default=None,
        metadata={
            "help": "A .txt (one prompt per line) or .json list, or a dataset (hub id, folder, parquet) whose "
            "--prompt_column to use; default: a built-in set (the scene prompts for the embedded model)."
        },
    )
    prompt_column: str | None = field(
        default=None,
        metadata={"help": "Prompt column when --prompts is a dataset; unset: caption or prompt, whichever it has."},
    )
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
    pipeline_kwargs: str | None = field(
        default=None,
        metadata={"help": 'Extra pipeline arguments as JSON, e.g. {"height": 480, "num_frames": 33}.'},
    )


@dataclass
class PairsArguments:
    """What `vipo-trl pairs` generates, how it scores and pairs, and where it writes."""

    model_name_or_path: list[str] | None = field(
        default=None,
        metadata={
            "help": "Hub ids or folders of the pipelines to sample from (sample k of a prompt comes from model "
            "k mod N); default: the embedded shapes model."
        },
    )
    lora: str | None = field(
        default=None,
        metadata={
            "help": "A training run's output loaded into the first model, a LoRA or a full fine-tune's folder (pairs "
            "from an aligned model: a round)."
        },
    )
    prompts: str | None = field(
        default=None,
        metadata={
            "help": "builtin (categories), a .txt (one prompt per line, or category<TAB>prompt), or a dataset whose "
            "--prompt_column to use; default: builtin, or the scene prompts for the embedded model."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Score an existing preference set's pairs again instead of generating (hub id, data file, "
            "folder; either schema; or default:clean|noisy|easy, the embedded model's sets): its labels are kept "
            "(--consistent_only keeps the pairs every scorer agrees with), or chosen by the scorers with --relabel."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of --dataset_name to score."})
    dataset_schema: Literal["auto", "pickapic", "generic"] = field(
        default="auto", metadata={"help": "Schema of --dataset_name: auto, pickapic or generic."}
    )
    chosen_column: str = field(default="chosen", metadata={"help": "Chosen image column of --dataset_name."})
    rejected_column: str = field(default="rejected", metadata={"help": "Rejected image column of --dataset_name."})
    relabel: bool = field(
        default=False,
        metadata={"help": "With --dataset_name: the scorers' combined score picks each winner (AI feedback)."},
    )
    max_pairs: int | None = field(default=None, metadata={"help": "With --dataset_name: score its first N rows."})
    pairs_per_shard: int = field(
        default=256, metadata={"help": "With --dataset_name: rows per shard file (the unit of resuming)."}
    )
    prompt_column: str | None = field(
        default=None,
        metadata={
            "help": "Prompt column of --prompts or --dataset_name when a dataset; unset: caption or prompt, whichever "
            "it has."
        },
    )
    category_column: str | None = field(
        default=None, metadata={"help": "Category column of --prompts or --dataset_name when a dataset."}
    )
    num_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    scorers: list[str] | None = field(
        default=None,
        metadata={"help": "Scorer names (default: pickscore hpsv2 imagereward; shapes for the embedded model)."},
    )
    judge_model: str | None = field(
        default=None,
        metadata={"help": "A vision-language model (e.g. Qwen/Qwen2.5-VL-7B-Instruct) that compares each pair."},
    )
    judge_aspect: str = field(
        default="overall", metadata={"help": "What the judge is asked: overall, alignment, aesthetics, plausibility."}
    )
    samples_per_prompt: int = field(default=4, metadata={"help": "Samples drawn per prompt."})
    combine: Literal["weighted_sum", "rank_average", "all_agree"] = field(
        default="weighted_sum", metadata={"help": "How several scorers make one score."}
    )
    weights: list[float] | None = field(default=None, metadata={"help": "One weight per scorer (weighted_sum)."})
    pairing: Literal["best_worst", "all_pairs"] = field(
        default="best_worst", metadata={"help": "Best against worst per prompt, or every pair past --margin."}
    )
    margin: float = field(default=0.0, metadata={"help": "Pair only samples whose scores differ by more than this."})
    consistent_only: bool = field(default=False, metadata={"help": "Keep only pairs every scorer orders alike."})
    max_margin: float | None = field(default=None, metadata={"help": "Drop pairs easier than this margin."})
    balance_categories: bool = field(default=False, metadata={"help": "Keep equally many pairs per category."})
    num_inference_steps: int | None = field(default=None, metadata={"help": "Sampling steps (default 30; 20)."})
    guidance_scale: float | None = field(default=None, metadata={"help": "Classifier-free guidance (default 7.5; 4)."})
    batch_size: int = field(
        default=8,
        metadata={"help": "Samples generated at once: whole prompts' samples, as many prompts as fit."},
    )
    prompts_per_shard: int = field(default=16, metadata={"help": "Prompts per shard file (the unit of resuming)."})
    seed: int = field(default=0, metadata={"help": "Fixes every sample's noise."})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)."})
    pipeline_kwargs: str | None = field(default=None, metadata={"help": "Extra pipeline arguments as JSON."})
    output_dir: str = field(default="vipo-pairs", metadata={"help": "Where shards, data/ and README.md go."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the set and its card as a dataset repo."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "The dataset repo id for --push_to_hub."})


@dataclass
class DiagnoseArguments:
    """What `vipo-trl diagnose` reads and how."""

    def data_options(self) -> Any:
        """The `DataOptions` that read the set as training would (schema, columns, ties)."""
        from ..data import DataOptions

        names = ("dataset_schema", "prompt_column", "chosen_column", "rejected_column", "category_column", "seed")
        return DataOptions(**{k: getattr(self, k) for k in names})

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub id, save_to_disk folder or data file of a preference set, or default:clean|noisy|easy for "
            "the embedded model's synthetic sets. May also be given as the first argument."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to diagnose."})
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
    dataset_schema: Literal["auto", "pickapic", "generic"] = field(
        default="auto", metadata={"help": "auto, pickapic or generic."}
    )
    prompt_column: str | None = field(default=None, metadata={"help": "Prompt column (default: caption / prompt)."})
    chosen_column: str = field(default="chosen", metadata={"help": "Chosen image column (generic schema)."})
    rejected_column: str = field(default="rejected", metadata={"help": "Rejected image column (generic schema)."})
    category_column: str | None = field(default=None, metadata={"help": "Category column: figures per category."})
    seed: int = field(default=0, metadata={"help": "Seed of the prompt shuffles (and of default:* sets)."})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)."})
    output_dir: str = field(default="vipo-diagnosis", metadata={"help": "Where diagnosis.json/.txt/.png go."})


class CliError(SystemExit):
    """A usage error: printed without a traceback, exit status 2."""

    def __init__(self, message: str):
        print(f"vipo-trl: error: {message}", file=sys.stderr)
        super().__init__(2)


def _field_names(dataclass_types: list[type]) -> set[str]:
    return {f.name for t in dataclass_types for f in dataclasses.fields(t) if f.init}


#: Flags of earlier vipo-trl versions (and of diffusers' scripts) -> TRL's names, for the "did you mean" hint.
RENAMED = {
    "model": "model_name_or_path",
    "pretrained_model_name_or_path": "model_name_or_path",
    "dataset": "dataset_name",
    "split": "dataset_train_split",
    "eval_split": "dataset_test_split",
    "streaming": "dataset_streaming",
    "revision_model": "model_revision",
}


#: Flags of diffusers' `train_diffusion_dpo*.py` and of the original Diffusion-DPO `train.py` -> what does the same
#: here (docs/cli.md, "Coming from the Diffusion-DPO training scripts", lists them all).
FROM_DIFFUSION_DPO_SCRIPTS = {
    "train_batch_size": "--per_device_train_batch_size",
    "max_train_steps": "--max_steps",
    "checkpointing_steps": "--save_steps",
    "checkpoints_total_limit": "--save_total_limit",
    "lr_scheduler": "--lr_scheduler_type",
    "lr_warmup_steps": "--warmup_steps",
    "mixed_precision": "--bf16 or --fp16",
    "use_8bit_adam": "--optim adamw_bnb_8bit",
    "use_adafactor": "--optim adafactor",
    "allow_tf32": "--tf32 true",
    "rank": "--use_peft --lora_r R --lora_alpha R",
    "beta_dpo": "--beta (the same -0.5 * beta convention as the original train.py and diffusers' SDXL script; "
    "diffusers' SD 1.5 script's --beta_dpo B is --beta 2B here)",
    "random_crop": "--no_center_crop",
    "no_hflip": "--no_random_flip",
    "validation_prompt": "--validation_prompts",
    "run_validation": "--validation_prompts P [P ...] (with --validation_steps)",
    "train_data_dir": "--dataset_name (a folder)",
    "sft": "--loss_type sft",
    "sdxl": "vipo-trl needs none: the model's model_index.json picks the family",
    "scale_lr": "vipo-trl takes the learning rate itself (the original SD 1.5 run's 1e-8 scaled by its 2048 "
    "pairs a step is --learning_rate 2.048e-5)",
    "choice_model": "vipo-trl relabels the set beforehand: vipo-trl pairs --dataset_name D --scorers pickscore "
    "--relabel",
    "pretrained_vae_model_name_or_path": "vipo-trl needs none for fp16: with --fp16 the VAE stays in float32; to "
    "train with another VAE, pass a pipeline with it swapped in (PolyDPOTrainer(model=pipe))",
}


#: Fields of `trl.DPOConfig` with no counterpart here -> why, and what to write instead (docs/cli.md, "Coming from
#: `trl dpo`", lists them all). Without it the closest name would mislead (`max_length` -> `max_sequence_length`).
FROM_TRL_DPO = {
    "max_length": "a sample's size is --resolution (and SD3/FLUX/Wan's prompt tokens --max_sequence_length)",
    "max_prompt_length": "prompts are cut by the text encoder (SD3/FLUX/Wan: --max_sequence_length)",
    "max_completion_length": "a sample's size is --resolution",
    "truncation_mode": "image pairs are not truncated: drop it",
    "padding_free": "image pairs are not padded: drop it",
    "pad_to_multiple_of": "image pairs are not padded: drop it",
    "pad_token": "image pairs are not padded: drop it",
    "padding_value": "image pairs are not padded: drop it",
    "dataset_num_proc": "images are decoded as batches are drawn: --dataloader_num_workers N decodes in N processes",
    "model_init_kwargs": "the pipeline loads with --revision, --variant and --torch_dtype; for anything else pass a "
    "pipeline you loaded yourself (PolyDPOTrainer(model=pipe))",
    "trust_remote_code": "the pipeline's own diffusers classes are used: drop it",
    "router_aux_loss_coef": "for mixture-of-experts language models: drop it",
    "disable_dropout": "diffusers' denoisers train without dropout (their configs set 0); LoRA's own is --lora_dropout",
    "precompute_ref_log_probs": "every step draws new noise and timesteps, so the reference's errors cannot be "
    "computed ahead; with LoRA the reference is the same network with its adapters off, and a latent cache "
    "(vipo-trl cache) saves the encoders' work",
    "precompute_ref_batch_size": "the reference cannot be computed ahead (see precompute_ref_log_probs): drop it",
    "ld_alpha": "LD-DPO weighs text by length; images have none (Poly-DPO's alpha is --poly_alpha, another thing)",
    "f_divergence_type": "the losses are --loss_type's (register another with vipo_trl.losses.register_loss)",
    "f_alpha_divergence_coef": "the losses are --loss_type's (register another with vipo_trl.losses.register_loss)",
    "use_weighting": "WPO's weighting is not built in (register it with vipo_trl.losses.register_loss); "
    "--loss_weighting is the flow-matching timestep weighting, another thing",
    "discopop_tau": "DiscoPOP is not built in: register it with vipo_trl.losses.register_loss",
    "rpo_alpha": "--loss_type poly_dpo sft --loss_weights 1 A (the chosen image's denoising error as the NLL term)",
    "activation_offloading": "not available for diffusers denoisers here; --gradient_checkpointing saves activations",
    "sync_ref_model": "TR-DPO's reference updates are not built in: the reference stays fixed within a run; a hard "
    "update is a next run with --start_from OUTPUT_DIR (policy and reference start from this run)",
    "ref_model_mixup_alpha": "TR-DPO's reference updates are not built in (see sync_ref_model)",
    "ref_model_sync_steps": "TR-DPO's reference updates are not built in (see sync_ref_model)",
}


def _hint(name: str, valid: set[str]) -> str:
    if RENAMED.get(name) in valid:
        return f" Did you mean {RENAMED[name]!r}?"
    if name in FROM_TRL_DPO:
        return f" That is a field of trl's DPOConfig; here: {FROM_TRL_DPO[name]}."
    replacement = FROM_DIFFUSION_DPO_SCRIPTS.get(name)
    if replacement and not replacement.startswith("--"):
        return f" That is a flag of the Diffusion-DPO training scripts: {replacement}."
    if replacement and replacement.split()[0][2:].removeprefix("no_") in valid:
        return f" That is a flag of the Diffusion-DPO training scripts; here: {replacement}."
    return did_you_mean(name, valid)


class VipoArgumentParser(TrlParser):
    """`trl.TrlParser` (YAML `--config` with an `env:` section, dataclass fields as flags) whose errors are one line
    (`vipo-trl: error: ...`, exit status 2) naming the closest valid field for an unknown flag or YAML key."""

    def __init__(self, dataclass_types: list[type], prog: str | None = None):
        self.dataclass_types_ = list(dataclass_types)
        self._first_groups: list[Any] = []
        self._late_groups: list[Any] = []
        # No abbreviations: `--model` must not silently mean `--model_name_or_path` (or be "ambiguous"). A short
        # usage line: argparse would otherwise list all several hundred flags before the first explanation.
        usage = f"{prog or 'vipo-trl'} [--config FILE.yaml] [--FLAG VALUE ...]  (sections below; --help lists all)"
        super().__init__(self.dataclass_types_, prog=prog, allow_abbrev=False, usage=usage)
        # `--help` shows the method's and the data's sections first, the inherited TrainingArguments last.
        special = self._first_groups + self._late_groups
        rest = [g for g in self._action_groups if g not in special]
        self._action_groups = rest[:2] + self._first_groups + rest[2:] + self._late_groups  # after -h's section

    def _add_dataclass_arguments(self, dtype: Any) -> None:
        groups = dtype.help_groups() if hasattr(dtype, "help_groups") else None
        if not groups:
            title = f"{dtype.__name__} ({dtype.__module__.split('.')[0]})"
            self._add_fields(self.add_argument_group(title), dtype, [f.name for f in dataclasses.fields(dtype)])
            return
        placed = [name for _, names in groups for name in names]
        for title, names in groups:
            group = self.add_argument_group(title)
            self._first_groups.append(group)
            self._add_fields(group, dtype, names)
        rest = [f.name for f in dataclasses.fields(dtype) if f.name not in placed]
        late = self.add_argument_group(
            "Inherited from transformers.TrainingArguments (logging, checkpoints, optimizer, precision, Hub, devices)"
        )
        self._late_groups.append(late)
        self._add_fields(late, dtype, rest)

    def _add_fields(self, group: Any, dtype: Any, names: list[str]) -> None:
        from typing import get_type_hints

        hints = get_type_hints(dtype)
        by_name = {f.name: f for f in dataclasses.fields(dtype)}
        for name in names:
            f = by_name[name]
            if not f.init:
                continue
            f.type = hints[name]
            self._parse_dataclass_field(group, f)

    def parse(self, argv: list[str]) -> tuple[Any, ...]:
        """The dataclasses filled from `--config` and the flags; `self.given` is then the set of fields the user
        set (by flag or in the file), whatever their value: a value equal to a default still counts as given."""
        valid = _field_names(self.dataclass_types_)
        config_path = _find_config(argv)
        from_yaml: dict[str, Any] = {}
        if config_path is not None:
            from_yaml = _check_config_file(config_path, valid)
            argv = _config_as_separate_flag(argv)
        dest_of = {option: action.dest for action in self._actions for option in action.option_strings}
        self.given = {dest_of[a.split("=", 1)[0]] for a in argv if a.split("=", 1)[0] in dest_of} - {"help"}
        self.given |= set(from_yaml) - {"env"}
        try:
            *parsed, from_file, from_flags = self.parse_args_and_config(
                argv, return_remaining_strings=True, separate_remaining_strings=True
            )
        except (OSError, yaml.YAMLError) as exc:
            raise CliError(f"cannot read --config {config_path}: {exc}".replace("\n", " ")) from None
        except ValueError as exc:  # a field rejected its value (e.g. beta <= 0), or the file is not a mapping
            raise CliError(str(exc)) from None
        if from_file:
            key = from_file[0].removeprefix("--")
            raise CliError(f"unknown key {key!r} in {config_path}.{_hint(key, valid)}")
        if from_flags:
            flag = next((r for r in from_flags if r.startswith("-")), from_flags[0])
            name = flag.lstrip("-").split("=")[0].replace("-", "_")
            raise CliError(f"unrecognized argument {flag!r}.{_hint(name, valid)}")
        return tuple(parsed)


def _find_config(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise CliError("--config needs a path to a YAML file.")
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _config_as_separate_flag(argv: list[str]) -> list[str]:
    out: list[str] = []
    for arg in argv:  # TrlParser reads `--config PATH` only
        out += ["--config", arg.split("=", 1)[1]] if arg.startswith("--config=") else [arg]
    return out


def _check_config_file(path: str, valid: set[str]) -> dict[str, Any]:
    """Read the YAML once up front, for errors that name the file (TrlParser's would be a traceback)."""
    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except OSError as exc:
        raise CliError(f"cannot read --config {path}: {exc.strerror or exc}.") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise CliError(f"--config {path} is not valid YAML{line}: {getattr(exc, 'problem', exc)}.") from None
    if not isinstance(values, dict):
        raise CliError(f"--config {path} must hold a mapping of field: value (and optionally env:), not {values!r}.")
    env = values.get("env", {})
    if not isinstance(env, dict):
        raise CliError(f"--config {path}: `env` must be a mapping of VARIABLE: value.")
    if "datasets" in values and "datasets" in valid:
        _check_mixture_entries(path, values["datasets"])
    return values


def _check_mixture_entries(path: str, entries: Any) -> None:
    """`datasets:` (TRL's `DatasetMixtureConfig`) is a list of mappings of `trl.scripts.utils.DatasetConfig` keys."""
    from trl.scripts.utils import DatasetConfig

    keys = [f.name for f in dataclasses.fields(DatasetConfig)]
    example = "`datasets:` followed by entries such as `  - path: pickapic_v2/` (keys: " + ", ".join(keys) + ")"
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise CliError(f"--config {path}: write {example}.")
    for i, entry in enumerate(entries):
        unknown = [key for key in entry if key not in keys]
        if unknown:
            raise CliError(
                f"--config {path}: datasets[{i}] has the unknown key {unknown[0]!r}.{_hint(unknown[0], set(keys))}"
            )
        if "path" not in entry:
            raise CliError(f"--config {path}: datasets[{i}] has no `path`; write {example}.")
