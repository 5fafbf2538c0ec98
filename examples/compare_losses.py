"""Train DPO, Diffusion-DPO, Poly-DPO, MaPO and KTO on the same data with the same seed and budget, then write one
table and one plot of their metrics.

    python examples/compare_losses.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --dataset yuvalkirstain/pickapic_v2 --max_steps 500 --output compare-sd15
    python examples/compare_losses.py --smoke          # tiny SD and synthetic pairs, CPU, a minute

Every run trains a LoRA from the same initialisation on the same batches (the per-pair noise and timesteps depend on
the seed, step and row only). Each loss optimises its own objective, so their training losses are not comparable;
the common yardstick is measured afterwards on held-out pairs with the same fixed noise for every run: the implicit
preference accuracy (share of pairs whose chosen image the model denoises better, relative to the base model, than the
rejected one) and the mean implicit reward margin, both in the Diffusion-DPO sense. "dpo" is the ViPO paper's name for
Diffusion-DPO, so those two rows must agree: a built-in sanity check.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

LOSSES = {
    "dpo": {"loss_type": ["dpo"]},
    "diffusion_dpo": {"loss_type": ["diffusion_dpo"]},
    "poly_dpo": {"loss_type": ["poly_dpo"]},  # poly_alpha from --poly_alpha
    "mapo": {"loss_type": ["mapo"]},
    "kto": {"loss_type": ["kto"]},
}


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


def compare(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from datasets import load_dataset
    from peft import LoraConfig

    from vipo_trl import PolyDPOConfig, PolyDPOTrainer

    if args.smoke:
        from vipo_trl.testing import pickapic_dataset, sd_pipeline

        model = str(Path(tempfile.mkdtemp()) / "tiny-sd")
        sd_pipeline().save_pretrained(model)
        train, held_out = pickapic_dataset(16, ties=2), pickapic_dataset(8)
        args.max_steps, args.resolution, args.batch_size, args.learning_rate = 4, 16, 4, 5e-3
    else:
        model = args.model
        data = load_dataset(args.dataset, split=args.split)
        split = data.train_test_split(test_size=args.eval_pairs, seed=args.seed)
        train, held_out = split["train"], split["test"]

    results = {}
    scratch = tempfile.TemporaryDirectory(prefix="compare-losses-")  # runs save nothing: no empty folders left
    for name, loss in LOSSES.items():
        config = PolyDPOConfig(
            output_dir=str(Path(scratch.name) / name),
            seed=args.seed,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            resolution=args.resolution,
            beta=args.beta,
            poly_alpha=args.poly_alpha,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=args.smoke,
            disable_tqdm=True,
            **loss,
        )
        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_r, init_lora_weights="gaussian")
        trainer = PolyDPOTrainer(model, config, train, peft_config=lora)
        trainer.train()
        history = [h for h in trainer.state.log_history if "loss" in h]
        results[name] = {
            "final_train_loss": history[-1]["loss"],
            **held_out_preference_metrics(trainer, held_out),
            "curve": [(h["step"], h["loss"]) for h in history],
        }
    scratch.cleanup()
    return results


def write_report(results: dict, output: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    rows = [
        "| loss | held-out implicit accuracy | held-out margin | final training loss (own objective) |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        rows.append(f"| {name} | {r['accuracy']:.3f} | {r['margin']:.4g} | {r['final_train_loss']:.4g} |")
    (output / "table.md").write_text(f"# {title}\n\n" + "\n".join(rows) + "\n")
    (output / "results.json").write_text(json.dumps(results, indent=2))

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
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
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output / "comparison.png", dpi=120)
    print("\n".join(rows))
    print(f"wrote {output / 'table.md'}, {output / 'results.json'} and {output / 'comparison.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--dataset", default="yuvalkirstain/pickapic_v2")
    parser.add_argument("--split", default="validation_unique")
    parser.add_argument("--eval_pairs", type=int, default=200)
    parser.add_argument("--max_steps", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--beta", type=float, default=2000.0)
    parser.add_argument("--poly_alpha", type=float, default=8.0)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="compare-losses")
    parser.add_argument("--smoke", action="store_true", help="tiny SD and synthetic pairs on the CPU")
    args = parser.parse_args()
    results = compare(args)
    title = "smoke run (tiny SD, synthetic pairs)" if args.smoke else f"{args.model} on {args.dataset}"
    write_report(results, Path(args.output), title)


if __name__ == "__main__":
    main()
