"""Train DPO, Diffusion-DPO, Poly-DPO, MaPO and KTO on the same data with the same seed and budget, then write one
table and one plot of their metrics.

    python examples/compare_losses.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --dataset pickapic_v2/ --max_steps 500 --output compare-sd15      # your preference set (any schema)
    python examples/compare_losses.py --smoke          # tiny SD and synthetic pairs, CPU, a minute
    python examples/compare_losses.py --embedded --seeds 0 1 2    # the embedded model, rewards; CPU, ~7 min a seed
    python examples/compare_losses.py --smoke --losses diffusion_dpo poly_dpo robust   # + robust DPO

Every run trains a LoRA from the same initialisation on the same batches (the per-pair noise and timesteps depend on
the seed, step and row only). Each loss optimises its own objective, so their training losses are not comparable;
the common yardstick is measured afterwards on held-out pairs with the same fixed noise for every run: the implicit
preference accuracy (share of pairs whose chosen image the model denoises better, relative to the base model, than the
rejected one) and the mean implicit reward margin, both in the Diffusion-DPO sense. "dpo" is the ViPO paper's name for
Diffusion-DPO, so those two rows must agree: a built-in sanity check.

`--embedded` trains on the embedded default's clean synthetic set (90% of its pairs; the other 10% are the held-out
pairs) with the embedded run's settings, and also scores what each run generates: the shapes reward of the aligned
model on the held-out samples the default run reports (every scene prompt x seeds 10001-10002), as a gain over the
base model. With several `--seeds` (each fixes the set, the split, the order and the noise, shared by every loss) the
table gives means with 95% t-intervals over seeds, and each loss's paired difference against Diffusion-DPO.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

LOSSES = {
    "dpo": {"loss_type": ["dpo"]},
    "diffusion_dpo": {"loss_type": ["diffusion_dpo"]},
    "poly_dpo": {"loss_type": ["poly_dpo"]},  # poly_alpha from --poly_alpha
    "mapo": {"loss_type": ["mapo"]},
    "kto": {"loss_type": ["kto"]},
    # The noisy-label baseline, on request (`--losses diffusion_dpo poly_dpo robust`): robust DPO, flip rate 0.1
    "robust": {"loss_type": ["robust"], "label_smoothing": 0.1},
}
#: What runs without --losses: the five the ViPO paper compares.
DEFAULT_LOSSES = ["dpo", "diffusion_dpo", "poly_dpo", "mapo", "kto"]

#: The run size for a real model (flags override each).
RUN_SIZE = {"max_steps": 500, "batch_size": 4, "learning_rate": 1e-5, "resolution": 512, "beta": 2000.0, "lora_r": 16}


def held_out_preference_metrics(trainer, eval_dataset) -> dict[str, float]:
    """Implicit accuracy and margin on `eval_dataset` under the Diffusion-DPO reading, whatever loss was trained."""
    from vipo_trl.losses import get_loss

    saved = trainer.loss_specs, trainer.needs_reference
    trainer.loss_specs, trainer.needs_reference = [get_loss("diffusion_dpo")], True  # LoRA: reference = adapters off
    try:
        metrics = trainer.evaluate(eval_dataset)
    finally:
        trainer.loss_specs, trainer.needs_reference = saved
    return {"accuracy": metrics["eval_rewards/accuracies"], "margin": metrics["eval_rewards/margins"]}


def compare(args: argparse.Namespace) -> dict[str, dict]:
    """Every loss at every seed: the held-out implicit metrics (and with `--embedded` the reward gain), per seed and
    summarised over seeds."""
    per_seed: dict[str, list[dict]] = {name: [] for name in args.losses}
    base_reward = None
    if args.embedded:
        from vipo_trl.default import evaluate_reward, load_default_pipeline

        seeds = tuple(args.eval_seeds)
        base_reward, _ = evaluate_reward(load_default_pipeline(), seeds)  # the same held-out samples for every run
    for seed in args.seeds:
        model, train, held_out = _data(args, seed)
        for name in args.losses:
            per_seed[name].append(_run(args, seed, model, train, held_out, LOSSES[name], base_reward))
    return {name: _summary(runs, per_seed["diffusion_dpo"]) for name, runs in per_seed.items()}


def _data(args: argparse.Namespace, seed: int):
    """The model, the training pairs and the held-out pairs of one seed; fills the run size the user left unset."""
    if args.smoke:
        from vipo_trl.testing import pickapic_dataset, sd_pipeline

        model = str(Path(tempfile.mkdtemp()) / "tiny-sd")
        sd_pipeline().save_pretrained(model)
        _fill(args, max_steps=4, resolution=16, batch_size=4, learning_rate=5e-3)
        return model, pickapic_dataset(16, ties=2), pickapic_dataset(8)
    if args.embedded:
        from vipo_trl.default import DEFAULT_SETTINGS, MODEL_DIR, load_default_pipeline, make_preference_set

        settings = {key: DEFAULT_SETTINGS[key] for key in ("max_steps", "learning_rate", "resolution", "beta")}
        _fill(args, **settings, batch_size=DEFAULT_SETTINGS["per_device_train_batch_size"], lora_r=8)
        pairs, _ = make_preference_set(
            "clean", load_default_pipeline(), seed=seed, samples_per_prompt=args.samples_per_prompt
        )
        split = pairs.train_test_split(test_size=0.1, seed=seed)
        return str(MODEL_DIR), split["train"], split["test"]
    from vipo_trl.data import load_preference_dataset

    _fill(args, **RUN_SIZE)
    dataset = load_preference_dataset(args.dataset, split=args.split)
    split = dataset.train_test_split(test_size=args.eval_pairs, seed=seed)
    return args.model, split["train"], split["test"]


def _fill(args: argparse.Namespace, **values) -> None:
    for key, value in values.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.lora_r = args.lora_r or RUN_SIZE["lora_r"]


def _run(args, seed, model, train, held_out, loss, base_reward) -> dict:
    from peft import LoraConfig

    from vipo_trl import PolyDPOConfig, PolyDPOTrainer

    with tempfile.TemporaryDirectory(prefix="compare-losses-") as scratch:  # no empty folders left behind
        config = PolyDPOConfig(
            output_dir=scratch,
            seed=seed,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            resolution=args.resolution,
            random_flip=not args.embedded,  # the shapes reward reads positions: the embedded run does not flip
            beta=args.beta,
            logging_steps=max(1, args.max_steps // 30),
            save_strategy="no",
            report_to=[],
            use_cpu=args.smoke or args.embedded,
            disable_tqdm=True,
            # --poly_alpha only where Poly-DPO runs (a setting no loss of the run reads is warned about)
            **({"poly_alpha": args.poly_alpha} if "poly_dpo" in loss["loss_type"] else {}),
            **loss,
        )
        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_r, init_lora_weights="gaussian")
        trainer = PolyDPOTrainer(model, config, train, peft_config=lora)
        trainer.train()
        history = [h for h in trainer.state.log_history if "loss" in h]
        run = {
            "seed": seed,
            "final_train_loss": history[-1]["loss"],
            **held_out_preference_metrics(trainer, held_out),
            "curve": [(h["step"], h["loss"]) for h in history],
        }
        if base_reward is not None:
            from vipo_trl.default import evaluate_reward, load_default_pipeline

            trainer.save_model()
            aligned, _ = evaluate_reward(load_default_pipeline(lora=scratch), tuple(args.eval_seeds))
            run["reward_gain"] = aligned - base_reward
    return run


def _summary(runs: list[dict], reference_runs: list[dict]) -> dict:
    """Means over seeds (the first seed's curve); with several seeds, 95% t-intervals and the paired difference of
    the reward gain against Diffusion-DPO."""
    summary = {key: statistics.fmean(r[key] for r in runs) for key in ("final_train_loss", "accuracy", "margin")}
    summary.update(curve=runs[0]["curve"], seeds=[r["seed"] for r in runs], runs=runs)
    if "reward_gain" in runs[0]:
        gains = [r["reward_gain"] for r in runs]
        versus = [r["reward_gain"] - ref["reward_gain"] for r, ref in zip(runs, reference_runs)]
        summary["reward_gain"] = _mean_interval(gains)
        summary["reward_gain_vs_diffusion_dpo"] = _mean_interval(versus)
    if len(runs) > 1:
        summary["accuracy_interval"] = _mean_interval([r["accuracy"] for r in runs])
    return summary


def _mean_interval(values: list[float]) -> dict:
    """Mean and 95% t-interval half width over seeds (`None` for one seed)."""
    from vipo_trl.eval import mean_interval

    interval = mean_interval(values)
    return {"mean": interval.mean, "half_width": interval.half_width if interval.n > 1 else None, "n": interval.n}


def write_report(results: dict, output: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    rewards = "reward_gain" in next(iter(results.values()))
    head = "| loss | held-out implicit accuracy | held-out margin | final training loss (own objective) |"
    rows = [head + (" reward gain over base | vs Diffusion-DPO |" if rewards else ""), "|---|---|---|---|"]
    rows[1] += "---|---|" if rewards else ""
    for name, r in results.items():
        row = f"| {name} | {_with_interval(r, 'accuracy', '.3f')} | {r['margin']:.4g} | {r['final_train_loss']:.4g} |"
        if rewards:
            row += f" {_interval(r['reward_gain'])} | {_interval(r['reward_gain_vs_diffusion_dpo'])} |"
        rows.append(row)
    seeds = next(iter(results.values()))["seeds"]
    title += f" (seeds {', '.join(map(str, seeds))}; means" + (
        ", 95% t-intervals over seeds)" if len(seeds) > 1 else ")"
    )
    (output / "table.md").write_text(f"# {title}\n\n" + "\n".join(rows) + "\n")
    (output / "results.json").write_text(json.dumps(results, indent=2))

    fig, axes = plt.subplots(1, 3 if rewards else 2, figsize=(16 if rewards else 11, 4))
    curves, bars = axes[0], axes[1]
    for name, r in results.items():
        steps, losses = zip(*r["curve"])
        if name == "dpo":  # the same run as diffusion_dpo: drawn dashed on top so both stay visible
            curves.plot(steps, losses, "--", marker="o", markersize=3, label="dpo (= diffusion_dpo)")
        else:
            curves.plot(steps, losses, label=name)
    curves.set(xlabel="step", ylabel="training loss (own objective)", title="training")
    curves.legend()
    names = list(results)
    bars.bar(names, [results[n]["accuracy"] for n in names], color="tab:blue")
    bars.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    bars.set(ylim=(0, 1), ylabel="held-out implicit accuracy", title="same held-out pairs, same noise")
    if rewards:  # what each run generates: the reward gain over the base, with its interval over seeds
        gains = [results[n]["reward_gain"] for n in names]
        errors = [g["half_width"] or 0.0 for g in gains]
        axes[2].bar(names, [g["mean"] for g in gains], yerr=errors, capsize=4, color="tab:green")
        axes[2].axhline(0, color="grey", linewidth=1)
        axes[2].set(ylabel="reward gain over the base", title="generated samples (95% interval over seeds)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output / "comparison.png", dpi=120)
    print("\n".join(rows))
    print(f"wrote {output / 'table.md'}, {output / 'results.json'} and {output / 'comparison.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--dataset", help="a preference set: hub id, file or folder, either schema")
    parser.add_argument("--split", default="train")
    parser.add_argument("--eval_pairs", type=int, default=200)
    # Run size: unset flags take the mode's values (RUN_SIZE, or the embedded run's settings with --embedded).
    parser.add_argument("--max_steps", type=int)
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--learning_rate", type=float)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--beta", type=float)
    parser.add_argument("--poly_alpha", type=float, default=8.0)
    parser.add_argument("--lora_r", type=int)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run of every loss per seed")
    parser.add_argument("--output", default="compare-losses")
    parser.add_argument("--smoke", action="store_true", help="tiny SD and synthetic pairs on the CPU")
    parser.add_argument(
        "--embedded", action="store_true", help="the embedded model on its clean set, with the shapes reward (CPU)"
    )
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), default=DEFAULT_LOSSES)
    parser.add_argument(
        "--samples_per_prompt", type=int, default=6, help="--embedded: base-model samples per scene for the set"
    )
    parser.add_argument(
        "--eval_seeds", type=int, nargs="+", default=[10_001, 10_002], help="--embedded: held-out sampling seeds"
    )
    args = parser.parse_args()
    if not (args.dataset or args.smoke or args.embedded):
        parser.error(
            "--dataset: name a preference set (a hub id, a file or a folder; Pick-a-Pic v2 is no longer on the Hub, "
            "so a copy you hold), or run --smoke or --embedded."
        )
    if "diffusion_dpo" not in args.losses:
        parser.error("--losses: include diffusion_dpo, the reference every other loss is compared with.")
    results = compare(args)
    if args.smoke:
        title = "smoke run (tiny SD, synthetic pairs)"
    elif args.embedded:
        title = f"embedded default, clean set, poly_alpha {args.poly_alpha:g}"
    else:
        title = f"{args.model} on {args.dataset}"
    write_report(results, Path(args.output), title)


def _interval(value: dict) -> str:
    half = value["half_width"]
    return f"{value['mean']:+.3f}" + (f" +- {half:.3f}" if half is not None else "")


def _with_interval(result: dict, key: str, spec: str) -> str:
    interval = result.get(f"{key}_interval")
    return f"{result[key]:{spec}}" + (f" +- {interval['half_width']:{spec}}" if interval else "")


if __name__ == "__main__":
    main()
