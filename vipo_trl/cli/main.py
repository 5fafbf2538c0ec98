"""The `vipo-trl` command: `train`, `cache`, `eval`, `pairs`, `diagnose` and `env` (also `python -m vipo_trl`)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import sys
from typing import Any

from ..utils import did_you_mean
from .help import cached, parser_for
from .parser import CliError

USAGE = """usage: vipo-trl <command> [flags]

commands:
  train    align a diffusion/flow model with Poly-DPO (or another preference loss)
  cache    precompute VAE latents and prompt embeddings into a latent cache
  eval     generate with a base model and base + LoRA, score both, report win rates
  pairs    make a preference set from your own model: generate, score, pair, filter, publish
  diagnose score both images of each pair of a preference set: label agreement, consistency, suggested alpha
  env      print the versions to paste into a bug report

`vipo-trl <command> --help` lists every flag; `--config run.yaml` reads them from a file."""


def _training_data(script: Any, mixture: Any, config: Any, with_eval: bool) -> tuple[Any, Any, str]:
    """The training set, the held-out set (when `with_eval`) and how errors name them: from --dataset_name, or from
    a YAML's `datasets:` mixture (TRL's `DatasetMixtureConfig`), whose splits are `train` and, with
    `test_split_size`, `test`."""
    if not mixture.datasets:
        train = _load_dataset(script, script.dataset_train_split)
        held_out = _load_dataset(script, script.dataset_test_split) if with_eval else None
        return train, held_out, f"--dataset_name {script.dataset_name}"
    from ..data import PreferenceDataError, load_dataset_mixture
    from . import checks

    if script.dataset_name is not None:
        raise CliError("give --dataset_name or a `datasets:` mixture, not both (trl dpo would ignore --dataset_name).")
    for entry in mixture.datasets:  # (the parser has made every entry a DatasetConfig: its file check says so)
        if entry.data_files is None and entry.data_dir is None:
            checks.check_dataset_name(entry.path, "datasets: path")
    if script.dataset_streaming and not mixture.streaming:  # TRL's two names for it; either streams the mixture
        mixture = dataclasses.replace(mixture, streaming=True)
    try:
        splits = load_dataset_mixture(mixture, seed=config.seed)
    except PreferenceDataError as exc:
        raise CliError(str(exc)) from None
    except (ValueError, OSError) as exc:
        message = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise CliError(f"datasets: cannot read the mixture: {message}") from None
    wanted = [script.dataset_train_split, *([script.dataset_test_split] if with_eval else [])]
    for split in wanted:
        if split not in splits:
            extra = "" if mixture.test_split_size is not None else " (set test_split_size to hold some rows out)"
            raise CliError(f"the `datasets:` mixture has the split(s) {list(splits)}, not {split!r}{extra}.")
    held_out = splits[script.dataset_test_split] if with_eval else None
    return splits[script.dataset_train_split], held_out, "the `datasets:` mixture"


def _load_dataset(script: Any, split: str) -> Any:
    from ..data import load_preference_dataset

    try:
        return load_preference_dataset(script.dataset_name, script.dataset_config, split, script.dataset_streaming)
    except (ValueError, OSError, StopIteration, IndexError) as exc:
        # e.g. an empty or malformed data file, which `datasets` reports from deep inside Arrow
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        empty_folder = isinstance(exc, IndexError) and os.path.isdir(script.dataset_name)  # save_to_disk of 0 rows
        if empty_folder or "corresponds to no data" in message or "BatchSize must be greater than 0" in message:
            raise CliError(f"--dataset_name {script.dataset_name}: the dataset has no rows.") from None
        raise CliError(f"--dataset_name {script.dataset_name} (split {split}): cannot read it: {message}") from None


def _trainer_inputs(model_args: Any, config: Any, given: set[str], embedded: bool = False) -> tuple[Any, Any]:
    """TRL's model flags as the trainer takes them: the LoRA config (`trl.get_peft_config`; for the `embedded`
    default, its own LoRA with the LoRA flags given applied), the quantization config
    (`trl.get_quantization_config`), and `--model_revision`/`--dtype` carried into the config's loading fields."""
    from trl import get_peft_config, get_quantization_config

    from ..models.base import check_lora_config
    from .checks import LORA_FLAG_OF, LORA_FLAGS

    if model_args.attn_implementation is not None:
        raise CliError("--attn_implementation applies to transformers models; diffusers pipelines choose their own.")
    if model_args.model_revision not in (None, "main"):
        if config.revision not in (None, model_args.model_revision):
            raise CliError(f"--model_revision {model_args.model_revision} and --revision {config.revision} disagree.")
        config.revision = model_args.model_revision
    if model_args.dtype not in (None, "auto", "float32") and config.torch_dtype is None:
        config.torch_dtype = model_args.dtype  # the frozen weights' dtype
    if embedded:
        from peft import LoraConfig

        from ..default import DEFAULT_LORA

        if "use_peft" in given and not model_args.use_peft:
            raise CliError(
                "--use_peft false: the embedded default trains a LoRA. To fine-tune a whole model, name it with "
                "--model_name_or_path and --dataset_name."
            )
        if model_args.load_in_4bit or model_args.load_in_8bit:
            raise CliError(
                "--load_in_4bit/--load_in_8bit (QLoRA, CUDA only) need a model named with --model_name_or_path: the "
                "embedded model is tiny and trains in full precision."
            )
        overrides = {field: getattr(model_args, flag) for flag, field in LORA_FLAGS.items() if flag in given}
        peft_config, quantization_config = LoraConfig(**{**DEFAULT_LORA, **overrides}), None
    else:
        lora_flags = [f"--{flag}" for flag in LORA_FLAGS if flag in given]
        if lora_flags and not model_args.use_peft and "use_peft" not in given:
            raise CliError(
                f"{' '.join(lora_flags)} set up a LoRA, but without --use_peft the whole denoiser is fine-tuned (as in "
                f"`trl dpo`). Add --use_peft, or drop {'them' if len(lora_flags) > 1 else 'it'} to fine-tune fully."
            )
        peft_config, quantization_config = get_peft_config(model_args), get_quantization_config(model_args)
    if peft_config is not None:
        peft_config.task_type = None  # a language-model task type means nothing to a UNet or transformer
        try:
            check_lora_config(peft_config, field_name=lambda field: f"--{LORA_FLAG_OF.get(field, 'lora_' + field)}")
        except ValueError as exc:
            raise CliError(str(exc)) from None
    return peft_config, quantization_config


def default_cpu_threads() -> int | None:
    """Give the embedded default half the cores' intra-op threads (at least one) unless `OMP_NUM_THREADS` is set;
    returns the count chosen, or None. torch takes every core, and beside one other busy process its threads wait
    on each other: on 2 cores two threads were 1.27x faster alone but 1.7-5x slower than one thread beside a busy
    process (benchmarks/RESULTS.md, bench_threads.py). A first run should not depend on an idle machine."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    threads = max(1, (os.cpu_count() or 1) // 2)
    torch.set_num_threads(threads)
    return threads


def train(argv: list[str]) -> None:

    from ..trainer import PolyDPOTrainer
    from . import checks

    parser = parser_for("train")
    script, model_args, train_args, config, mixture = parser.parse(argv)
    if script.ignore_bias_buffers:
        raise CliError("--ignore_bias_buffers is for language models trained with DDP; it has no effect here.")
    if model_args.model_name_or_path is None and script.dataset_name is None and not mixture.datasets:
        for flag in ("ref_model", "start_from"):
            if getattr(train_args, flag):
                needs = "needs --model_name_or_path and --dataset_name; the embedded default has none."
                raise CliError(f"--{flag} {needs}")
        if train_args.reward_scorers:
            raise CliError("--reward_scorers needs --model_name_or_path and --dataset_name; the embedded default "
                           "reports its own reward.")  # fmt: skip
        try:
            from ..default import apply_default_settings, run_default
        except ImportError:
            raise CliError("name --model_name_or_path and --dataset_name (this build has no embedded model).") from None
        apply_default_settings(config, given=parser.given)
        peft_config, _ = _trainer_inputs(model_args, config, parser.given, embedded=True)
        checks.check_output_dir(config)
        checks.check_resume(config, peft_config)
        if config.use_cpu:
            threads = default_cpu_threads()
            if threads is not None:
                print(f"vipo-trl: {threads} of {os.cpu_count()} CPU threads (set OMP_NUM_THREADS to choose)")
        run_default(config, peft_config=peft_config)
        return
    if model_args.model_name_or_path is None or (script.dataset_name is None and not mixture.datasets):
        raise CliError("name both --model_name_or_path and --dataset_name (or neither, to run the embedded default).")
    # Everything the user named is checked before any model is loaded.
    checks.check_model(model_args.model_name_or_path)
    if script.dataset_name is not None:
        checks.check_dataset_name(script.dataset_name)
    if train_args.ref_model:
        checks.check_ref_model(train_args.ref_model)
    for weights in train_args.start_from or []:
        checks.check_aligned(weights, "--start_from")
    checks.check_reference_base(train_args.ref_model, train_args.start_from)
    if train_args.reward_scorers and not config.validation_prompts:
        raise CliError("--reward_scorers scores the images drawn for --validation_prompts: give those prompts too.")
    checks.check_output_dir(config)
    peft_config, quantization_config = _trainer_inputs(model_args, config, parser.given)
    if train_args.start_from and quantization_config is not None:
        raise CliError(
            "--start_from fuses earlier runs into the base, which cannot be done to a base loaded in 4/8 bits "
            "(--load_in_4bit/--load_in_8bit): fuse them into the full-precision model, save that pipeline, and train "
            "a QLoRA on the saved one."
        )
    checks.check_resume(config, peft_config, train_args.start_from, train_args.ref_model)
    train_dataset, eval_dataset, where = _training_data(script, mixture, config, config.eval_strategy != "no")
    checks.check_dataset(train_dataset, where, config.data_options())
    trainer = PolyDPOTrainer(
        model_args.model_name_or_path,
        config,
        train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
        quantization_config=quantization_config,
        ref_model=train_args.ref_model,
        start_from=train_args.start_from,
    )
    trainer.dataset_name = script.dataset_name or [entry.path for entry in mixture.datasets]
    if train_args.reward_scorers:
        from ..eval import RewardEvalCallback

        try:
            callback = RewardEvalCallback(
                trainer, config.validation_prompts, train_args.reward_scorers, eval_steps=config.validation_steps,
                seeds=(config.seed,),
            )  # fmt: skip
        except (OSError, ValueError) as exc:  # an unknown scorer, weights that cannot be read
            raise CliError(f"--reward_scorers: {exc}") from None
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model()
    kind = "LoRA" if trainer.is_lora else trainer.family.denoiser_name
    print(f"vipo-trl: {kind} saved to {config.output_dir} after {trainer.state.global_step} steps")
    if config.push_to_hub:
        trainer.push_to_hub()


def cache(argv: list[str]) -> None:

    from ..trainer import build_latent_cache

    parser = parser_for("cache")
    script, model_args, cache_args, config, mixture = parser.parse(argv)
    if not (model_args.model_name_or_path and (script.dataset_name or mixture.datasets) and cache_args.cache_output):
        raise CliError("cache needs --model_name_or_path, --dataset_name (or `datasets:`) and --cache_output.")
    _trainer_inputs(model_args, config, parser.given)
    folder = build_latent_cache(
        model_args.model_name_or_path,
        _training_data(script, mixture, config, with_eval=False)[0],
        cache_args.cache_output,
        config,
        shard_size=cache_args.shard_size,
        batch_size=cache_args.encode_batch_size,
    )
    print(f"latent cache written to {folder}")


def evaluate(argv: list[str]) -> None:
    from ..eval import evaluate_alignment, load_prompts

    parser = parser_for("eval")
    (args,) = parser.parse(argv)
    if args.baseline and not args.lora:
        raise CliError("--baseline is what --lora is compared with: name the run to compare (--lora FOLDER) too.")
    from . import checks

    for weights in (args.lora, args.baseline):
        if weights:
            checks.check_aligned(weights)
    embedded = args.model_name_or_path is None
    if embedded:  # sampled as `vipo-trl train` reports its rewards: DDIM, its steps, guidance, batch and seeds
        from ..default import ALL_SCENES, EVAL_SEEDS, load_default_pipeline
        from ..default.synthetic import SAMPLING_BATCH, SAMPLING_GUIDANCE, SAMPLING_STEPS, use_ddim

        model, prompts, scorers = use_ddim(load_default_pipeline()), [s.prompt for s in ALL_SCENES], ["shapes"]
        steps, guidance = SAMPLING_STEPS, SAMPLING_GUIDANCE
        if "seeds" not in parser.given:
            args.seeds = list(EVAL_SEEDS)
        if "batch_size" not in parser.given:
            args.batch_size = SAMPLING_BATCH
    else:
        model, prompts, scorers, steps, guidance = args.model_name_or_path, None, ["pickscore"], 30, 7.5
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
            pipeline_kwargs=_json_flag(args.pipeline_kwargs, "--pipeline_kwargs"),
            baseline=args.baseline,
        )
    except ValueError as exc:  # an unknown scorer, a bad prompt file, ...
        raise CliError(str(exc)) from None
    seeds = ", ".join(map(str, args.seeds))
    print(f"{len(result.prompts)} images per model ({len(prompts)} prompts x seeds {seeds})")
    print(result.table())
    plot = " and scores.png" if os.path.isfile(os.path.join(args.output_dir, "scores.png")) else ""
    if args.lora:
        rows = ", ".join(result.labels)
        print(f"results.json, results.md, grid.png (rows: {rows}){plot} in {args.output_dir}")
    else:
        print(
            f"results.json, results.md, grid.png (the base model only: pass --lora FOLDER to compare an aligned "
            f"model){plot} in {args.output_dir}"
        )
    if embedded:
        print("(the embedded default's held-out samples, as `vipo-trl train` reports them, unless --seeds is given)")


def _json_flag(value: str | None, flag: str) -> dict:
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise CliError(f"{flag}: not valid JSON ({exc.msg}); e.g. '{{\"height\": 480}}'.") from None
    if not isinstance(parsed, dict):
        raise CliError(f"{flag}: give a JSON object, e.g. '{{\"height\": 480}}'.")
    return parsed


def pairs(argv: list[str]) -> None:
    import torch

    from ..eval import make_pairs
    from . import checks

    parser = parser_for("pairs")
    (args,) = parser.parse(argv)
    if args.push_to_hub and not args.hub_dataset_id:
        raise CliError("--push_to_hub needs --hub_dataset_id (e.g. you/my-pairs).")
    if args.dataset_name:
        return _rescore(args, parser.given)
    for flag in ("relabel", "max_pairs", "pairs_per_shard", "dataset_schema", "chosen_column", "rejected_column"):
        if flag in parser.given:
            raise CliError(f"--{flag} applies to the pairs of an existing set: name it with --dataset_name.")
    if args.lora:
        checks.check_aligned(args.lora)
    device = _process_device(args.device)
    embedded = not args.model_name_or_path
    if embedded:
        from ..default import ALL_SCENES, load_default_pipeline
        from ..default.synthetic import SAMPLING_BATCH, SAMPLING_GUIDANCE, SAMPLING_STEPS, use_ddim

        pipe = use_ddim(load_default_pipeline(args.lora))
        if "batch_size" not in parser.given:
            args.batch_size = SAMPLING_BATCH  # the tiny model samples fastest in large batches
        pipes, names = {"vipo-trl embedded model" + (f" + {args.lora}" if args.lora else ""): pipe}, ["embedded"]
        prompts = args.prompts or [(scene.prompt, scene.shape) for scene in ALL_SCENES]
        scorers, steps, guidance = args.scorers or ["shapes"], SAMPLING_STEPS, SAMPLING_GUIDANCE
    else:
        from diffusers import DiffusionPipeline

        from ..models.generation import load_aligned_weights

        checks.check_model(args.model_name_or_path[0])
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        pipes, names = {}, list(args.model_name_or_path)
        for k, name in enumerate(names):
            pipe = DiffusionPipeline.from_pretrained(name, torch_dtype=dtype)
            if k == 0 and args.lora:
                load_aligned_weights(pipe, args.lora)
                name = f"{name} + {args.lora}"
            pipes[name] = pipe
        prompts = args.prompts or "builtin"
        scorers, steps, guidance = args.scorers or ["pickscore", "hpsv2", "imagereward"], 30, 7.5
    for pipe in pipes.values():
        pipe.to(device)
    try:
        from ..data.prompts import load_prompt_set

        items = load_prompt_set(prompts, args.prompt_column, args.category_column, args.num_prompts)
        resolved = _pair_scorers(args, scorers, device)
        result = make_pairs(
            items,
            pipes,
            resolved,
            args.output_dir,
            samples_per_prompt=args.samples_per_prompt,
            num_inference_steps=args.num_inference_steps or steps,
            guidance_scale=args.guidance_scale if args.guidance_scale is not None else guidance,
            pipeline_kwargs=_json_flag(args.pipeline_kwargs, "--pipeline_kwargs"),
            combine=args.combine,
            weights=args.weights,
            pairing=args.pairing,
            margin=args.margin,
            filters=_pair_filters(args),
            prompts_per_shard=args.prompts_per_shard,
            batch_size=args.batch_size,
            seed=args.seed,
            describe={"models": names, "lora": args.lora},
            push_to_hub=args.hub_dataset_id if args.push_to_hub else None,
        )
    except (OSError, ValueError) as exc:
        raise CliError(str(exc)) from None
    if result is None:  # a non-main process of a multi-process run
        return
    stats = result.stats
    per_category = ", ".join(f"{k}: {v}" for k, v in sorted(stats.per_category.items()))
    print(f"{stats.pairs} pairs ({stats.candidate_pairs} candidates) written to {result.output_dir / 'data'}")
    print(f"per category: {per_category}")
    if stats.consistency is not None:
        print(f"every scorer agrees on {100 * stats.consistency:.1f}% of the candidate pairs")
    print(f"dataset card: {result.output_dir / 'README.md'}")
    model = None if embedded else args.model_name_or_path[0]
    print(f"train on it: {_train_command(model, result.output_dir, result.dataset, next(iter(pipes)))}")
    if args.lora:
        print(
            "(the samples came from base + LoRA: for a next round with that model as the reference, see the Rounds "
            "section of docs/pairs.md)"
        )


def _pair_filters(args: Any) -> Any:
    """The `PairFilters` of the `vipo-trl pairs` flags."""
    from ..data.pairing import PairFilters

    flags = dict(consistent_only=args.consistent_only, max_margin=args.max_margin, balance=args.balance_categories)
    return PairFilters(**flags, seed=args.seed)


def _pair_scorers(args: Any, default: list[str], device: str) -> list[Any]:
    """`--scorers` (else `default`) on `device`, and the VLM judge when `--judge_model` names one."""
    from ..eval import get_scorer
    from ..eval.evaluate import resolve_scorers

    scorers = resolve_scorers(args.scorers or default, device=device)
    if args.judge_model:
        scorers.append(get_scorer("vlm_judge", model=args.judge_model, aspect=args.judge_aspect, device=device))
    return scorers


def _process_device(device: str | None) -> str:
    """`--device`, else CUDA when there is one; under `accelerate launch` this process's own device."""
    import torch

    if device is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        return str(PartialState(cpu=not torch.cuda.is_available()).device)
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


#: `vipo-trl pairs` flags that shape generation, which scoring an existing set's pairs has none of.
GENERATION_FLAGS = (
    "model_name_or_path", "lora", "prompts", "num_prompts", "samples_per_prompt", "pairing", "num_inference_steps",
    "guidance_scale", "batch_size", "prompts_per_shard", "pipeline_kwargs",
)  # fmt: skip


def _rescore(args: Any, given: set[str]) -> None:
    """`vipo-trl pairs --dataset_name`: an existing set's pairs scored again, kept or relabelled, filtered, written."""
    from ..data import DataOptions
    from ..eval import rescore_pairs

    mixed = [f"--{flag}" for flag in GENERATION_FLAGS if flag in given]
    if mixed:
        raise CliError(
            f"{', '.join(mixed)} shape(s) generating new samples; --dataset_name scores the pairs an existing set "
            "already has: drop one or the other."
        )
    device = _process_device(args.device)
    options = DataOptions(
        **{k: getattr(args, k) for k in ("dataset_schema", "prompt_column", "chosen_column", "rejected_column")},
        category_column=args.category_column,
        seed=args.seed,
    )
    try:
        dataset, embedded = _preference_set(args)
        scorers = _pair_scorers(args, ["shapes"] if embedded else ["pickscore", "hpsv2", "imagereward"], device)
        result = rescore_pairs(
            dataset,
            scorers,
            args.output_dir,
            options=options,
            relabel=args.relabel,
            combine=args.combine,
            weights=args.weights,
            margin=args.margin,
            filters=_pair_filters(args),
            max_pairs=args.max_pairs,
            pairs_per_shard=args.pairs_per_shard,
            describe={"source": args.dataset_name, "split": args.dataset_train_split},
            push_to_hub=args.hub_dataset_id if args.push_to_hub else None,
        )
    except (OSError, ValueError) as exc:
        raise CliError(str(exc)) from None
    if result is None:  # a non-main process of a multi-process run
        return
    stats = result.stats
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(stats.skipped_rows.items()))
    print(
        f"{stats.pairs} pairs ({stats.candidate_pairs} candidates"
        + (f"; source rows skipped: {skipped}" if skipped else "")
        + f") written to {result.output_dir / 'data'}"
    )
    if stats.label_agreement is not None:
        print(f"the scorers prefer the labelled winner on {100 * stats.label_agreement:.1f}% of the candidate pairs")
    if stats.consistency is not None:
        print(f"every scorer agrees on {100 * stats.consistency:.1f}% of the candidate pairs")
    print(f"dataset card: {result.output_dir / 'README.md'}")
    if embedded:  # the embedded model's set: its model, settings and image size
        print(f"train on it: {_train_command(None, result.output_dir, result.dataset)}")
    else:
        print(f"train on it: vipo-trl train --model_name_or_path MODEL --dataset_name {result.output_dir} --use_peft")


def _train_command(model: str | None, pairs_dir: Any, dataset: Any, generator: str | None = None) -> str:
    """The `vipo-trl train` command that trains the pairs' model (the first one named, or the embedded model) on
    them with LoRA at the size that model's samples were drawn at, so a 32 px set is not trained upscaled to 512 px."""
    import io

    from PIL import Image

    from ..data.video import looks_like_video

    flags = {"model_name_or_path": model, "dataset_name": str(pairs_dir)}
    if model is None:  # the embedded model: its folder and the embedded run's training settings
        from ..default import DEFAULT_LORA, DEFAULT_SETTINGS, MODEL_DIR

        flags["model_name_or_path"] = str(MODEL_DIR)
        keys = ("learning_rate", "beta", "per_device_train_batch_size", "max_steps", "random_flip")
        flags.update({key: DEFAULT_SETTINGS[key] for key in keys})
        flags.update(lora_r=DEFAULT_LORA["r"], lora_alpha=DEFAULT_LORA["lora_alpha"])  # not TRL's r=16, alpha 32
    if "chosen_generator" in dataset.column_names:  # made by `pairs`: an image of the named generator
        rows = dataset.select_columns(["chosen", "chosen_generator"]) if len(dataset) else []
        sample = next((row["chosen"] for row in rows if row["chosen_generator"] == generator), None)
    else:  # rescored pairs of an existing set
        sample = dataset[0]["chosen"] if len(dataset) else None
    if isinstance(sample, bytes) and not looks_like_video(sample):
        flags["resolution"] = min(Image.open(io.BytesIO(sample)).size)
    values = {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in flags.items()}
    return " ".join(["vipo-trl train --use_peft", *(f"--{key} {shlex.quote(v)}" for key, v in values.items())])


def diagnose(argv: list[str]) -> None:
    from ..eval import diagnose as run_diagnosis

    if argv and not argv[0].startswith("-"):  # `vipo-trl diagnose DATASET [flags]`
        argv = ["--dataset_name", argv[0], *argv[1:]]
    (args,) = parser_for("diagnose").parse(argv)
    options = args.data_options()
    if args.dataset_name is None:
        raise CliError("name the preference set: vipo-trl diagnose DATASET (or default:clean|noisy|easy).")
    dataset, embedded = _preference_set(args)
    scorers = args.scorers or (["shapes"] if embedded else ["pickscore", "hpsv2", "imagereward", "aesthetic", "clip"])
    try:
        report = run_diagnosis(
            dataset,
            scorers,
            options,
            max_pairs=args.max_pairs,
            easy_relevance=args.easy_relevance,
            prompt_shuffles=args.prompt_shuffles,
            output_dir=args.output_dir,
            device=args.device,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(report)
    plot = " and diagnosis.png" if os.path.isfile(os.path.join(args.output_dir, "diagnosis.png")) else ""
    print(f"diagnosis.json, diagnosis.txt{plot} in {args.output_dir}")
    if report.consistency < 1:
        print(
            "to train on the pairs every scorer agrees with: vipo-trl pairs --dataset_name "
            f"{args.dataset_name} --scorers {' '.join(scorers)} --consistent_only --output_dir CONSISTENT_SET"
        )


def _preference_set(args: Any) -> tuple[Any, bool]:
    """The set `--dataset_name` names (`diagnose`, `pairs`), and whether it is one of the embedded model's synthetic
    sets (`default:clean|noisy|easy`, made on the spot from `--seed`)."""
    if args.dataset_name.startswith("default:"):
        from ..default import KINDS, load_default_pipeline, make_preference_set

        kind = args.dataset_name.split(":", 1)[1]
        if kind not in KINDS:
            raise CliError(
                f"--dataset_name {args.dataset_name}: the embedded sets are {', '.join('default:' + k for k in KINDS)}."
            )
        return make_preference_set(kind, load_default_pipeline(), seed=args.seed)[0], True
    from ..data import load_preference_dataset
    from . import checks

    checks.check_dataset_name(args.dataset_name)
    return load_preference_dataset(args.dataset_name, args.dataset_config, args.dataset_train_split), False


def env(argv: list[str]) -> None:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from .._version import __version__

    lines = {"vipo-trl": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for package in (
        "torch",
        "diffusers",
        "transformers",
        "trl",
        "peft",
        "accelerate",
        "bitsandbytes",
        "datasets",
        "huggingface_hub",
        "deepspeed",
        "av",
    ):
        try:
            lines[package] = version(package)
        except PackageNotFoundError:
            lines[package] = "not installed"
    lines["CUDA available"] = str(torch.cuda.is_available())
    lines["CUDA version"] = str(torch.version.cuda)
    if torch.cuda.is_available():
        lines["GPU"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    # As `trl env`: the default `accelerate launch` settings, which decide how a multi-GPU run is split.
    from accelerate.commands.config import default_config_file, load_config_from_file

    if os.path.isfile(default_config_file):
        settings = load_config_from_file(default_config_file).to_dict()
        lines["accelerate config"] = "".join(f"\n    - {key}: {value}" for key, value in settings.items())
    else:
        lines["accelerate config"] = "not found (`accelerate config` writes one)"
    width = max(map(len, lines))
    print("\n".join(f"- {k.ljust(width)}: {v}" for k, v in lines.items()))


COMMANDS = {"train": train, "cache": cache, "eval": evaluate, "pairs": pairs, "diagnose": diagnose, "env": env}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    debug = "--debug" in argv or os.environ.get("VIPO_TRL_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        hint = did_you_mean(command, COMMANDS)
        raise CliError(f"unknown command {command!r}.{hint} Commands: {', '.join(COMMANDS)}.")
    if ("-h" in rest or "--help" in rest) and cached(command) is not None:
        print(cached(command), end="")  # rendered ahead from the same parser: no torch import just to print text
        raise SystemExit(0)  # as argparse's own --help
    quiet_known_warnings()
    try:
        COMMANDS[command](rest)
    except CliError:
        raise
    except _known_input_errors() as exc:
        if debug:
            raise
        # A bad input met after the checks (a corrupt row with strict_data, a NaN loss past the limit, ...):
        # its message names the input; the traceback is for --debug (or VIPO_TRL_DEBUG=1).
        raise CliError(f"{exc} (run with --debug for the traceback)") from None


def _known_input_errors() -> tuple[type[BaseException], ...]:
    from ..data.images import PreferenceDataError
    from ..data.video import MissingDependency
    from ..eval.scorers import ScorerUnavailable

    errors = (PreferenceDataError, ValueError, FileNotFoundError, FloatingPointError)
    return (*errors, ScorerUnavailable, MissingDependency)


def quiet_known_warnings() -> None:
    """Silence library messages that are harmless for this command line (the library API leaves them alone)."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "Failed to load CPU gemm_4bit_forward ..."
    for message in (
        r".*torch_dtype.*deprecated.*",
        r".*pin_memory.*",
        r".*requires torchvision.*",
        # TRL's name, kept by `trl dpo` configs and ours; transformers >= 5.23 maps it to `activation_checkpointing`
        r"`gradient_checkpointing` is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=message)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # The libraries log through a handler on their root logger; a filter there sees their submodules' records too.
    diffusers_logging.get_logger("diffusers")
    transformers_logging.get_logger("transformers")
    for name, text in (
        ("transformers", "requires torchvision"),
        ("diffusers", "No LoRA keys associated to"),
        ("diffusers", "torch_dtype"),
    ):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(lambda record, text=text: text not in record.getMessage())


if __name__ == "__main__":
    main()
