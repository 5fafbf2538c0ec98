"""The `vipo-trl` command: `train`, `cache`, `eval`, `diagnose` and `env` (also `python -m vipo_trl`)."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

from .parser import (
    CacheArguments,
    CliError,
    DiagnoseArguments,
    EvalArguments,
    LoraArguments,
    ScriptArguments,
    VipoArgumentParser,
)

USAGE = """usage: vipo-trl <command> [flags]

commands:
  train    align a diffusion/flow model with Poly-DPO (or another preference loss)
  cache    precompute VAE latents and prompt embeddings into a latent cache
  eval     generate with a base model and base + LoRA, score both, report win rates
  diagnose score both images of each pair of a preference set: label agreement, consistency, suggested alpha
  env      print the versions to paste into a bug report

`vipo-trl <command> --help` lists every flag; `--config run.yaml` reads them from a file."""


def load_preference_dataset(script: ScriptArguments, split: str | None = None) -> Any:
    """A dataset from a hub id, a `save_to_disk` folder, a data file, or a latent cache folder (returned as a path)."""
    from datasets import load_dataset, load_from_disk

    from ..data import is_latent_cache

    name, split = script.dataset, split or script.split
    if is_latent_cache(name):
        return name
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_info.json")):
        return load_from_disk(name)
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_dict.json")):
        return load_from_disk(name)[split]
    extension = os.path.splitext(name)[1].lstrip(".")
    if os.path.isfile(name) and extension in ("parquet", "json", "jsonl", "csv", "arrow"):
        builder = {"jsonl": "json"}.get(extension, extension)
        return load_dataset(builder, data_files={split: name}, split=split, streaming=script.streaming)
    return load_dataset(name, script.dataset_config, split=split, streaming=script.streaming)


def train(argv: list[str]) -> None:
    from ..trainer import PolyDPOConfig, PolyDPOTrainer

    parser = VipoArgumentParser([ScriptArguments, LoraArguments, PolyDPOConfig], prog="vipo-trl train")
    script, lora, config = parser.parse(argv)
    if script.model is None and script.dataset is None:
        try:
            from ..default import run_default
        except ImportError:
            raise CliError("name --model and --dataset (this build has no embedded default model).") from None
        return run_default(config)
    if script.model is None or script.dataset is None:
        raise CliError("name both --model and --dataset (or neither, to run the embedded default).")
    train_dataset = load_preference_dataset(script)
    eval_dataset = load_preference_dataset(script, script.eval_split) if script.eval_split else None
    trainer = PolyDPOTrainer(
        script.model, config, train_dataset, eval_dataset=eval_dataset, peft_config=lora.to_peft_config()
    )
    trainer.dataset_name = script.dataset
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model()
    if config.push_to_hub:
        trainer.push_to_hub()


def cache(argv: list[str]) -> None:
    from ..data import build_latent_cache
    from ..trainer import PolyDPOConfig

    parser = VipoArgumentParser([ScriptArguments, CacheArguments, PolyDPOConfig], prog="vipo-trl cache")
    script, cache_args, config = parser.parse(argv)
    if not (script.model and script.dataset and cache_args.cache_output):
        raise CliError("cache needs --model, --dataset and --cache_output.")
    folder = build_latent_cache(
        script.model,
        load_preference_dataset(script),
        cache_args.cache_output,
        config,
        shard_size=cache_args.shard_size,
        batch_size=cache_args.encode_batch_size,
    )
    print(f"latent cache written to {folder}")


def evaluate(argv: list[str]) -> None:
    from ..eval import evaluate_alignment, load_prompts

    (args,) = VipoArgumentParser([EvalArguments], prog="vipo-trl eval").parse(argv)
    embedded = args.model is None
    if embedded:
        from ..default import ALL_SCENES, MODEL_DIR

        model, prompts, scorers, steps, guidance = str(MODEL_DIR), [s.prompt for s in ALL_SCENES], ["shapes"], 20, 4.0
    else:
        model, prompts, scorers, steps, guidance = args.model, None, ["pickscore"], 30, 7.5
    if args.prompts is not None or prompts is None:
        try:
            prompts = load_prompts(args.prompts, args.prompt_column)
        except (OSError, ValueError) as exc:
            raise CliError(f"--prompts: {exc}") from None
    prompts = prompts[: args.num_prompts] if args.num_prompts else prompts
    try:
        result = evaluate_alignment(
            model,
            args.lora,
            prompts,
            args.scorers or scorers,
            seeds=args.seeds,
            num_inference_steps=args.num_inference_steps or steps,
            guidance_scale=args.guidance_scale if args.guidance_scale is not None else guidance,
            output_dir=args.output_dir,
            batch_size=args.batch_size,
            device=args.device,
        )
    except ValueError as exc:  # an unknown scorer, a bad prompt file, ...
        raise CliError(str(exc)) from None
    print(f"{len(result.prompts)} images per model ({len(prompts)} prompts x {len(args.seeds)} seeds)")
    print(result.table())
    print(f"results.json, results.md, grid.png (top: base, bottom: aligned) and scores.png in {args.output_dir}")


def diagnose(argv: list[str]) -> None:
    from ..eval import diagnose as run_diagnosis

    if argv and not argv[0].startswith("-"):  # `vipo-trl diagnose DATASET [flags]`
        argv = ["--dataset", argv[0], *argv[1:]]
    (args,) = VipoArgumentParser([DiagnoseArguments], prog="vipo-trl diagnose").parse(argv)
    try:
        config = args.to_config()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.dataset is None:
        raise CliError("name the preference set: vipo-trl diagnose DATASET (or default:clean|noisy|easy).")
    if args.dataset.startswith("default:"):
        from ..default import KINDS, load_default_pipeline, make_preference_set

        kind = args.dataset.split(":", 1)[1]
        if kind not in KINDS:
            raise CliError(
                f"--dataset {args.dataset}: the embedded sets are {', '.join('default:' + k for k in KINDS)}."
            )
        dataset, _ = make_preference_set(kind, load_default_pipeline(), seed=config.seed)
        scorers = args.scorers or ["shapes"]
    else:
        script = ScriptArguments(dataset=args.dataset, dataset_config=args.dataset_config, split=args.split)
        dataset = load_preference_dataset(script)
        scorers = args.scorers or ["pickscore", "hpsv2", "imagereward", "aesthetic", "clip"]
    try:
        report = run_diagnosis(
            dataset,
            scorers,
            config,
            max_pairs=args.max_pairs,
            easy_relevance=args.easy_relevance,
            prompt_shuffles=args.prompt_shuffles,
            output_dir=args.output_dir,
            device=args.device,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(report)
    print(f"diagnosis.json, diagnosis.txt and diagnosis.png in {args.output_dir}")


def env(argv: list[str]) -> None:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from .. import __version__

    lines = {"vipo-trl": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for package in ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "av"):
        try:
            lines[package] = version(package)
        except PackageNotFoundError:
            lines[package] = "not installed"
    lines["CUDA available"] = str(torch.cuda.is_available())
    lines["CUDA version"] = str(torch.version.cuda)
    if torch.cuda.is_available():
        lines["GPU"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    width = max(map(len, lines))
    print("\n".join(f"- {k.ljust(width)}: {v}" for k, v in lines.items()))


COMMANDS = {"train": train, "cache": cache, "eval": evaluate, "diagnose": diagnose, "env": env}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise CliError(f"unknown command {command!r}.{hint} Commands: {', '.join(COMMANDS)}.")
    COMMANDS[command](rest)


if __name__ == "__main__":
    main()
