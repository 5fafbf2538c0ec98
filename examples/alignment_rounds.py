"""Alignment rounds on the embedded default, end to end through the public API:

    round 1: pairs from the base model (`make_pairs`, shapes reward) -> Poly-DPO LoRA, reference = the base
    round 2: pairs from the round-1 model (base + LoRA 1) -> a new LoRA trained on round 1's model (LoRA 1 fused into
             the base), reference = round 1's model (the same network with the new adapters disabled)
    control: round 1 trained as many steps again on round 1's pairs (does a second round beat training longer?)

Each model is scored by the shapes reward on 384 held-out samples (every scene prompt x seeds 10001-10008, 20 DDIM
steps), the same samples for every model. Design fixed before running: seeds 0 and 1, the default run's training
settings (LoRA r=8, 300 steps of 8 pairs, lr 3e-3, beta 2000, alpha 0), 6 samples per prompt, every pair whose
rewards differ.

    python examples/alignment_rounds.py                       # seeds 0 1, writes docs/rounds/
    python examples/alignment_rounds.py --seeds 0 --steps 50  # a quick look
    python examples/alignment_rounds.py --smoke --output_dir /tmp/rounds  # the whole loop in seconds; no figures

Results: `docs/rounds/results.json` and `docs/rounds/table.md`; resumable per seed (a finished seed is not rerun).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

EVAL_SEEDS = tuple(range(10_001, 10_009))


def train_lora(model, pairs, output_dir: Path, seed: int, steps: int) -> Path:
    from peft import LoraConfig

    from vipo_trl import PolyDPOConfig, PolyDPOTrainer
    from vipo_trl.default import DEFAULT_LORA, DEFAULT_SETTINGS

    settings = {**DEFAULT_SETTINGS, "output_dir": str(output_dir), "seed": seed, "max_steps": steps}
    settings.update(logging_steps=50, disable_tqdm=True)
    trainer = PolyDPOTrainer(model, PolyDPOConfig(**settings), pairs, peft_config=LoraConfig(**DEFAULT_LORA))
    trainer.train()
    trainer.save_model()
    return output_dir


def pipeline(*loras: Path, fuse_all: bool = False):
    """The embedded model with `loras` applied in order: all but the last fused into the weights (all of them with
    `fuse_all`: the starting point of the next round, with no adapter left loaded)."""
    from vipo_trl.default import load_default_pipeline
    from vipo_trl.default.synthetic import use_ddim

    pipe = use_ddim(load_default_pipeline())
    for k, lora in enumerate(loras):
        pipe.load_lora_weights(str(lora), adapter_name=f"round{k + 1}")
        if k < len(loras) - 1 or fuse_all:
            pipe.fuse_lora()
            pipe.unload_lora_weights()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def scenes(step: int = 1) -> list:
    """The scene prompts: all of them, or one in `step` (the smoke run)."""
    from vipo_trl.default import ALL_SCENES

    return ALL_SCENES[::step]


def reward(pipe, eval_seeds=EVAL_SEEDS, scenes_step: int = 1) -> float:
    from vipo_trl.default import evaluate_reward

    return evaluate_reward(pipe, seeds=eval_seeds, scenes=scenes(scenes_step))[0]


def pairs_from(pipe, folder: Path, seed: int, samples_per_prompt: int = 6, scenes_step: int = 1):
    from vipo_trl.default.synthetic import SAMPLING_GUIDANCE, SAMPLING_STEPS
    from vipo_trl.eval import make_pairs

    result = make_pairs(
        [(s.prompt, s.shape) for s in scenes(scenes_step)], pipe, ["shapes"], folder,
        samples_per_prompt=samples_per_prompt, num_inference_steps=SAMPLING_STEPS, guidance_scale=SAMPLING_GUIDANCE,
        pairing="all_pairs", batch_size=48, seed=seed, progress=False,
    )  # fmt: skip
    return result.dataset, result.stats


def run_seed(seed: int, out: Path, steps: int, eval_seeds=EVAL_SEEDS, samples_per_prompt=6, scenes_step=1) -> dict:
    start = time.perf_counter()
    work = out / "work" / f"seed{seed}"
    from vipo_trl.default import MODEL_DIR

    def score(pipe) -> float:
        return reward(pipe, eval_seeds, scenes_step)

    def pairs(pipe, folder: Path, pair_seed: int):
        return pairs_from(pipe, folder, pair_seed, samples_per_prompt, scenes_step)

    base_reward = score(pipeline())
    pairs1, stats1 = pairs(pipeline(), work / "pairs1", seed)
    lora1 = train_lora(str(MODEL_DIR), pairs1, work / "lora1", seed, steps)
    round1 = score(pipeline(lora1))
    pairs2, stats2 = pairs(pipeline(lora1), work / "pairs2", seed + 1000)
    lora2 = train_lora(pipeline(lora1, fuse_all=True), pairs2, work / "lora2", seed, steps)  # the reference: round 1
    round2 = score(pipeline(lora1, lora2))
    control = train_lora(str(MODEL_DIR), pairs1, work / "lora1_long", seed, 2 * steps)
    longer = score(pipeline(control))
    return {
        "seed": seed,
        "steps_per_round": steps,
        "eval_seeds": list(eval_seeds),
        "samples_per_prompt": samples_per_prompt,
        "scenes_step": scenes_step,
        "base": base_reward,
        "round1": round1,
        "round2": round2,
        "round1_twice_the_steps": longer,
        "pairs_round1": stats1.pairs,
        "pairs_round2": stats2.pairs,
        "minutes": (time.perf_counter() - start) / 60,
    }


def table(runs: list[dict]) -> str:
    lines = [
        "| seed | base | round 1 | round 2 | round 1, twice the steps | pairs (round 1 / 2) |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['seed']} | {r['base']:.3f} | {r['round1']:.3f} | {r['round2']:.3f} | "
            f"{r['round1_twice_the_steps']:.3f} | {r['pairs_round1']} / {r['pairs_round2']} |"
        )
    if len(runs) > 1:
        mean = {k: statistics.fmean(r[k] for r in runs) for k in ("base", "round1", "round2", "round1_twice_the_steps")}
        lines.append(
            f"| mean | {mean['base']:.3f} | {mean['round1']:.3f} | {mean['round2']:.3f} | "
            f"{mean['round1_twice_the_steps']:.3f} | |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval_seeds", type=int, nargs="+", default=list(EVAL_SEEDS))
    parser.add_argument("--samples_per_prompt", type=int, default=6)
    parser.add_argument("--output_dir", default="docs/rounds")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seed 0, 2 steps a round, 1 eval seed, one scene in 6, 2 samples a prompt: checks the loop, in seconds",
    )
    args = parser.parse_args()
    if args.smoke:
        if args.output_dir == parser.get_default("output_dir"):
            parser.error("--smoke writes no figures worth keeping: give it its own --output_dir")
        args.seeds, args.steps, args.eval_seeds, args.samples_per_prompt = [0], 2, [10_001], 2
    scenes_step = 6 if args.smoke else 1
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    runs = json.loads(results_file.read_text()) if results_file.exists() else []

    def design(run: dict) -> tuple:  # runs from before these fields were recorded used the defaults
        recorded = (run.get("eval_seeds", EVAL_SEEDS), run.get("samples_per_prompt", 6), run.get("scenes_step", 1))
        return (run["steps_per_round"], tuple(recorded[0]), *recorded[1:])

    wanted = (args.steps, tuple(args.eval_seeds), args.samples_per_prompt, scenes_step)
    done = {r["seed"] for r in runs if design(r) == wanted}
    for seed in args.seeds:
        if seed in done:
            print(f"seed {seed}: done earlier, kept", flush=True)
            continue
        runs.append(run_seed(seed, out, args.steps, tuple(args.eval_seeds), args.samples_per_prompt, scenes_step))
        results_file.write_text(json.dumps(runs, indent=2))
        print(json.dumps(runs[-1]), flush=True)
    runs = [r for r in runs if design(r) == wanted and r["seed"] in args.seeds]
    (out / "table.md").write_text(table(runs) + "\n")
    print(table(runs))


if __name__ == "__main__":
    main()
