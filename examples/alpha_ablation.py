"""The alpha study on the embedded default: does Poly-DPO's alpha, fitted to a set's noise, beat Diffusion-DPO, and
does it do anything a different learning rate would not?

    python examples/alpha_ablation.py                  # the full study (resumable: finished runs are not rerun)
    python examples/alpha_ablation.py --smoke --output /tmp/alpha-smoke

Design, fixed before any result was seen (issue 13):

* sets (`vipo_trl.default.make_preference_set`, rebuilt for every seed from the base model's own samples):
  `clean` (correct labels), `noisy` (two generators, one-attribute annotators: conflicting pairs, then 20% flips),
  `easy` (losers made for another prompt, as the paper's over-simple set).
* arms: Poly-DPO with alpha in -1, -0.5, 0, 0.5, 1, 8 (alpha 0 is Diffusion-DPO), LoRA r=8, 300 steps of 8 pairs,
  learning rate 3e-3, beta 2000 (the embedded default's setting), trained from the set's latent cache through
  `PolyDPOTrainer`. Control: for alpha -1, 1 and 8, Diffusion-DPO at the learning rate times the mean
  `poly_dpo/grad_scale` (`1 + alpha p`) that alpha's run logged, same seed.
* seeds 0-4: a seed fixes the set, the training order and the noise, and is shared by every arm (paired). Seeds
  5-7 were added later for every arm (`--seeds 5 6 7`), decided before they ran, for the +-0.01 interval target.
* evaluation: every scene prompt x held-out seeds 10001-10008 (384 samples, the same for every arm and the base),
  10 DDIM steps at guidance 4; the score is the programmatic reward (share of colour, shape, position right).
* statistics: per cell the mean gain over the base with a 95% t-interval over seeds; per alpha the paired
  difference against alpha 0; per set the per-seed least-squares slope of gain on alpha over [-1, 1]; per control
  the paired difference alpha-run minus control.
* verdicts: noisy (paper: gain rises with alpha) and easy (paper: falls) by the slope's interval: on the paper's side
  of 0 "reproduced", on the other "contradicted", across 0 "not distinguishable". clean (paper: peak at 0):
  "contradicted" if some alpha's paired difference lies above 0, "reproduced" if alpha 0 has the best mean and none
  does, else "not distinguishable". A control "differs" when its paired interval excludes 0.

Runs go two at a time, one intra-op thread each (on a 2-core CPU that beats one run on two threads). Every finished
run is a JSON file under `<output>/runs/`; the report (`results.json`, `table.md`, `alpha_study.png`) is rebuilt
from those files, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

ALPHAS = (-1.0, -0.5, 0.0, 0.5, 1.0, 8.0)
CONTROLLED_ALPHAS = (-1.0, 1.0, 8.0)
SETS = ("clean", "noisy", "easy")
SEEDS = (0, 1, 2, 3, 4)
EVAL_SEEDS = tuple(range(10_001, 10_009))
LEARNING_RATE = 3e-3
TARGET_HALF_WIDTH = 0.01  # issue 13: every cell's 95% interval at most +-0.01 reward
# The paper's Fig. 4 (SD1.5, HPSv2.1): alpha -> score, per set (our names).
PAPER_FIG4 = {
    "noisy": {-1.0: 26.0, -0.5: 26.4, 0.0: 26.6, 0.5: 26.8, 1.0: 27.1},
    "easy": {-1.0: 29.6, -0.5: 29.0, 0.0: 28.7, 0.5: 28.5, 1.0: 28.4},
    "clean": {-1.0: 29.7, -0.5: 29.6, 0.0: 29.78, 0.5: 29.7, 1.0: 29.7},
}
PAPER_DIRECTION = {"noisy": "rises", "easy": "falls", "clean": "peaks at 0"}


@dataclass(frozen=True)
class Plan:
    """What one study runs: the grid, the seeds and the size of each run."""

    sets: tuple[str, ...] = SETS
    alphas: tuple[float, ...] = ALPHAS
    controlled: tuple[float, ...] = CONTROLLED_ALPHAS
    seeds: tuple[int, ...] = SEEDS
    steps: int = 300
    eval_seeds: tuple[int, ...] = EVAL_SEEDS
    eval_steps: int = 10
    scenes_step: int = 1  # every scene prompt; the smoke run takes one in `scenes_step`
    samples_per_prompt: int = 6


SMOKE = Plan(
    sets=("clean", "noisy"),
    alphas=(0.0, 1.0),
    controlled=(1.0,),
    seeds=(0, 1),
    steps=3,
    eval_seeds=(10_001,),
    eval_steps=3,
    scenes_step=6,
    samples_per_prompt=4,
)


# --- work done in the worker processes -------------------------------------------------------------------------------

_BASE = None


def _worker_init(threads: int) -> None:
    import warnings

    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    sys.stdout = open(os.devnull, "w")  # Trainer prints its logs; the scheduler prints one line per finished run


def _base():
    global _BASE
    if _BASE is None:
        from vipo_trl.default import load_default_pipeline

        _BASE = load_default_pipeline()
        _BASE.set_progress_bar_config(disable=True)
    return _BASE


def _scenes(plan: Plan) -> list:
    from vipo_trl.default import ALL_SCENES

    return ALL_SCENES[:: plan.scenes_step]


def evaluate(pipe, plan: Plan) -> dict:
    """Mean reward and per-attribute accuracy on every (scene prompt, eval seed); the same samples for every arm."""
    import numpy as np

    from vipo_trl.default import generate
    from vipo_trl.default.shapes import attribute_scores

    prompts = [s.prompt for s in _scenes(plan) for _ in plan.eval_seeds]
    seeds = [seed for _ in _scenes(plan) for seed in plan.eval_seeds]
    images = generate(pipe, prompts, seeds, steps=plan.eval_steps)
    scores = np.array([attribute_scores(im, p) for im, p in zip(images, prompts)], dtype=float)
    colour, shape, position = scores.mean(axis=0).tolist()
    return {
        "reward": float(scores.mean()),
        "colour": colour,
        "shape": shape,
        "position": position,
        "samples": len(prompts),
    }


def task_base(plan: Plan, path: str) -> dict:
    result = evaluate(_base(), plan)
    _write_json(path, result)
    return result


def task_set(plan: Plan, kind: str, seed: int, work: str, path: str) -> dict:
    """Build the preference set of (kind, seed) from the base model's samples, and its latent cache."""
    from vipo_trl import PolyDPOConfig, build_latent_cache
    from vipo_trl.default import MODEL_DIR, make_preference_set

    dataset, stats = make_preference_set(
        kind, _base(), seed=seed, scenes=_scenes(plan), samples_per_prompt=plan.samples_per_prompt
    )
    cache = os.path.join(work, "cache", f"{kind}-seed{seed}")
    config = PolyDPOConfig(output_dir=cache, resolution=32, random_flip=False, seed=seed, report_to=[], use_cpu=True)
    build_latent_cache(str(MODEL_DIR), dataset, cache, config, show_progress=False, device="cpu")
    result = {
        "set": kind,
        "seed": seed,
        "pairs": stats.pairs,
        "flip_rate": stats.flip_rate,
        "conflict_rate": stats.conflict_rate,
        **stats.extra,
        "cache": cache,
    }
    _write_json(path, result)
    return result


def task_train(
    plan: Plan,
    kind: str,
    seed: int,
    alpha: float,
    lr: float,
    arm: str,
    work: str,
    path: str,
    matched_alpha: float | None = None,
    loss: dict | None = None,
) -> dict:
    """Train one arm from the set's cache with the public API, then score the aligned model. A learning-rate
    control is Diffusion-DPO (alpha 0) whose `lr` was matched to the run of `matched_alpha`. `loss` replaces the
    Poly-DPO loss settings (e.g. `{"loss_type": "robust", "label_smoothing": 0.1}`, examples/robust_study.py)."""
    from peft import LoraConfig

    from vipo_trl import PolyDPOConfig, PolyDPOTrainer
    from vipo_trl.default import DEFAULT_LORA, MODEL_DIR, load_default_pipeline

    out = os.path.join(work, "models", Path(path).stem)
    config = PolyDPOConfig(
        output_dir=out,
        **(loss or {"loss_type": "poly_dpo", "poly_alpha": alpha}),
        beta=2000.0,
        max_steps=plan.steps,
        per_device_train_batch_size=8,
        learning_rate=lr,
        resolution=32,
        random_flip=False,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=max(1, min(20, plan.steps)),
        seed=seed,
    )
    cache = os.path.join(work, "cache", f"{kind}-seed{seed}")
    lora = LoraConfig(**DEFAULT_LORA)
    trainer = PolyDPOTrainer(str(MODEL_DIR), config, cache, peft_config=lora)
    start = time.perf_counter()
    trainer.train()
    trainer.save_model()
    seconds = time.perf_counter() - start
    logged = [h["poly_dpo/grad_scale"] for h in trainer.state.log_history if "poly_dpo/grad_scale" in h]
    accuracy = [h["rewards/accuracies"] for h in trainer.state.log_history if "rewards/accuracies" in h]
    pipe = load_default_pipeline(lora=out)
    result = {
        "set": kind,
        "seed": seed,
        "alpha": alpha,
        "learning_rate": lr,
        "arm": arm,
        "matched_alpha": matched_alpha,
        "grad_scale": sum(logged) / len(logged) if logged else None,  # logged by Poly-DPO only
        **({"loss": loss} if loss else {}),
        "final_accuracy": accuracy[-1] if accuracy else None,
        "train_seconds": seconds,
        **evaluate(pipe, plan),
    }
    _write_json(path, result)
    return result


def _write_json(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)  # a run is either finished (its file whole) or rerun


# --- the scheduler ---------------------------------------------------------------------------------------------------


def run_study(plan: Plan, output: Path, workers: int, threads: int) -> None:
    """Run every task not yet finished, two at a time, respecting dependencies (set -> arms -> controls)."""
    work = output / "runs"
    for sub in ("sets", "arms", "cache", "models"):
        (work / sub).mkdir(parents=True, exist_ok=True)

    def set_file(kind, seed):
        return work / "sets" / f"{kind}-seed{seed}.json"

    def arm_file(kind, seed, alpha, arm="poly_dpo"):
        return work / "arms" / f"{kind}-seed{seed}-alpha{alpha:g}-{arm}.json"

    tasks = [("base", (), work / "base.json", lambda: [])]
    for seed in plan.seeds:  # seed-major: a study stopped early has every cell for its first seeds
        for kind in plan.sets:
            tasks.append(("set", (kind, seed), set_file(kind, seed), lambda: []))
            for alpha in plan.alphas:
                tasks.append(
                    ("arm", (kind, seed, alpha), arm_file(kind, seed, alpha), lambda k=kind, s=seed: [set_file(k, s)])
                )
            for alpha in plan.controlled:
                tasks.append(
                    (
                        "control",
                        (kind, seed, alpha),
                        arm_file(kind, seed, alpha, "lr_control"),
                        lambda k=kind, s=seed, a=alpha: [set_file(k, s), arm_file(k, s, a)],
                    )
                )
    pending = [t for t in tasks if not t[2].is_file()]
    print(
        f"{len(tasks) - len(pending)} of {len(tasks)} tasks already done; running {len(pending)} "
        f"({workers} workers x {threads} thread)",
        flush=True,
    )
    start = time.perf_counter()
    with ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=_worker_init, initargs=(threads,)
    ) as pool:
        running: dict = {}
        done_count = 0
        while pending or running:
            for task in list(pending):
                if len(running) >= workers:
                    break
                kind_of, key, path, deps = task
                if not all(d.is_file() for d in deps()):
                    continue
                pending.remove(task)
                if kind_of == "base":
                    future = pool.submit(task_base, plan, str(path))
                elif kind_of == "set":
                    future = pool.submit(task_set, plan, *key, str(work), str(path))
                elif kind_of == "arm":
                    future = pool.submit(task_train, plan, *key, LEARNING_RATE, "poly_dpo", str(work), str(path))
                else:
                    s, seed, alpha = key
                    scale = json.loads(arm_file(s, seed, alpha).read_text())["grad_scale"]
                    future = pool.submit(
                        task_train, plan, s, seed, 0.0, LEARNING_RATE * scale, "lr_control", str(work), str(path), alpha
                    )
                running[future] = task
            if not running:
                raise RuntimeError(f"tasks waiting on dependencies that never finish: {[t[:2] for t in pending]}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                task = running.pop(future)
                result = future.result()  # a failed run stops the study with its error
                done_count += 1
                minutes = (time.perf_counter() - start) / 60
                summary = {k: result[k] for k in ("reward", "grad_scale", "pairs", "conflict_rate") if k in result}
                print(
                    f"[{done_count}/{done_count + len(pending) + len(running)} {minutes:.1f} min] {task[0]} "
                    f"{task[1]} {summary}",
                    flush=True,
                )


# --- the report ------------------------------------------------------------------------------------------------------


def collect(plan: Plan, output: Path) -> dict:
    work = output / "runs"
    base = json.loads((work / "base.json").read_text())
    sets = [json.loads(p.read_text()) for p in sorted((work / "sets").glob("*.json"))]
    runs = [json.loads(p.read_text()) for p in sorted((work / "arms").glob("*.json"))]
    runs = [r for r in runs if r["set"] in plan.sets and r["seed"] in plan.seeds]
    for r in runs:
        r["gain"] = r["reward"] - base["reward"]
    return {"base": base, "sets": sets, "runs": runs}


def statistics(results: dict) -> dict:
    """Cell means, paired differences against alpha 0, slopes over [-1, 1] and the controls, with 95% intervals."""
    from vipo_trl.eval import mean_interval

    runs = results["runs"]

    def gains(kind, alpha, arm="poly_dpo"):
        return {r["seed"]: r["gain"] for r in runs if r["set"] == kind and r["alpha"] == alpha and r["arm"] == arm}

    def controls(kind, alpha):  # controls are alpha-0 runs, told apart by the alpha whose scale they borrowed
        return {
            r["seed"]: r["gain"]
            for r in runs
            if r["set"] == kind and r["arm"] == "lr_control" and r.get("matched_alpha") == alpha
        }

    stats: dict = {"cells": [], "versus_dpo": [], "slopes": [], "controls": []}
    for kind in sorted({r["set"] for r in runs}, key=SETS.index):
        alphas = sorted({r["alpha"] for r in runs if r["set"] == kind and r["arm"] == "poly_dpo"})
        for alpha in alphas:
            g = gains(kind, alpha)
            stats["cells"].append(
                {"set": kind, "alpha": alpha, "seeds": sorted(g), "gain": mean_interval(list(g.values())).to_dict()}
            )
            if alpha != 0.0:
                dpo = gains(kind, 0.0)
                seeds = sorted(set(g) & set(dpo))
                if seeds:
                    stats["versus_dpo"].append(
                        {
                            "set": kind,
                            "alpha": alpha,
                            "seeds": seeds,
                            "difference": mean_interval([g[s] - dpo[s] for s in seeds]).to_dict(),
                        }
                    )
        grid = [a for a in alphas if -1.0 <= a <= 1.0]
        per_seed = []
        for seed in sorted({r["seed"] for r in runs if r["set"] == kind}):
            points = [(a, gains(kind, a).get(seed)) for a in grid]
            if len(grid) >= 2 and all(v is not None for _, v in points):
                mean_a = sum(a for a, _ in points) / len(points)
                mean_g = sum(v for _, v in points) / len(points)
                per_seed.append(
                    sum((a - mean_a) * (v - mean_g) for a, v in points) / sum((a - mean_a) ** 2 for a, _ in points)
                )
        if per_seed:
            stats["slopes"].append(
                {
                    "set": kind,
                    "alphas": grid,
                    "slope_per_unit_alpha": mean_interval(per_seed).to_dict(),
                    "per_seed": per_seed,
                }
            )
        for alpha in sorted({r.get("matched_alpha") for r in runs if r["set"] == kind and r["arm"] == "lr_control"}):
            g, c = gains(kind, alpha), controls(kind, alpha)
            seeds = sorted(set(g) & set(c))
            lrs = [r["learning_rate"] for r in runs if r["set"] == kind and r.get("matched_alpha") == alpha]
            stats["controls"].append(
                {
                    "set": kind,
                    "alpha": alpha,
                    "seeds": seeds,
                    "mean_learning_rate": sum(lrs) / len(lrs),
                    "control_gain": mean_interval([c[s] for s in seeds]).to_dict(),
                    "alpha_minus_control": mean_interval([g[s] - c[s] for s in seeds]).to_dict(),
                }
            )
    return stats


def seeds_needed(values: list[float], target: float = TARGET_HALF_WIDTH, confidence: float = 0.95) -> int:
    """Seeds a cell would need for a 95% half width of at most `target`, were its seed-to-seed spread what was
    measured: the smallest n with t(n-1) * sd / sqrt(n) <= target (sd of `values`, with n - 1)."""
    import math

    from vipo_trl.eval import t_quantile

    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    n = max(2, math.ceil((1.959964 * sd / target) ** 2))  # the normal bound; t is wider, so step up from there
    while t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n) > target:
        n += 1
    return n


def planning(results: dict) -> dict:
    """What the +-0.01 target would cost at the measured spreads: seeds per cell, and the study's CPU time per seed
    (every arm and control of one seed, from the runs' logged training time, run two at a time)."""
    runs = results["runs"]
    need = []
    for kind in SETS:
        for alpha in sorted({r["alpha"] for r in runs if r["set"] == kind and r["arm"] == "poly_dpo"}):
            g = [r["gain"] for r in runs if r["set"] == kind and r["alpha"] == alpha and r["arm"] == "poly_dpo"]
            if len(g) >= 2:
                need.append({"set": kind, "alpha": alpha, "seeds": len(g), "seeds_needed": seeds_needed(g)})
    seeds = {r["seed"] for r in runs}
    train_seconds_per_seed = sum(r.get("train_seconds", 0.0) for r in runs) / max(1, len(seeds))
    return {
        "target_half_width": TARGET_HALF_WIDTH,
        "cells": need,
        "train_seconds_per_seed": train_seconds_per_seed,
        "wall_hours_per_seed_two_workers": train_seconds_per_seed / 2 / 3600,
    }


def verdicts(stats: dict) -> dict:
    """The pre-registered reading of the statistics (see the module docstring)."""
    out = {}
    for slope in stats["slopes"]:
        kind, s = slope["set"], slope["slope_per_unit_alpha"]
        if kind in ("noisy", "easy"):
            paper_sign = 1 if kind == "noisy" else -1
            if s["low"] > 0 or s["high"] < 0:
                verdict = "reproduced" if (s["mean"] > 0) == (paper_sign > 0) else "contradicted"
            else:
                verdict = "not distinguishable"
        else:
            diffs = [d for d in stats["versus_dpo"] if d["set"] == kind]
            cells = {c["alpha"]: c["gain"]["mean"] for c in stats["cells"] if c["set"] == kind}
            if any(d["difference"]["low"] > 0 for d in diffs):
                verdict = "contradicted"
            elif cells and max(cells, key=cells.get) == 0.0:
                verdict = "reproduced"
            else:
                verdict = "not distinguishable"
        out[kind] = {"paper": PAPER_DIRECTION[kind], "verdict": verdict}
    for control in stats["controls"]:
        d = control["alpha_minus_control"]
        out[control["set"]][f"alpha {control['alpha']:g} vs its lr control"] = (
            ("alpha better" if d["mean"] > 0 else "control better")
            if d["low"] > 0 or d["high"] < 0
            else "not distinguishable from a learning-rate change"
        )
    return out


def _fmt(interval: dict) -> str:
    return f"{interval['mean']:+.3f} ± {interval['half_width']:.3f}"


def report(plan: Plan, output: Path, command: str) -> dict:
    results = collect(plan, output)
    results["stats"] = statistics(results)
    results["verdicts"] = verdicts(results["stats"])
    results["planning"] = planning(results)
    results["plan"] = {k: list(v) if isinstance(v, tuple) else v for k, v in plan.__dict__.items()}
    results["command"] = command
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=1))
    table = _table(results)
    (output / "table.md").write_text(table)
    _plot(results, output / "alpha_study.png")
    print(table)
    return results


def _table(results: dict) -> str:
    stats, base = results["stats"], results["base"]
    alphas = sorted({c["alpha"] for c in stats["cells"]})
    seeds = sorted({r["seed"] for r in results["runs"]})
    lines = [
        "# Alpha study on the embedded default",
        "",
        f"Reward gain of the aligned model over the base (base reward {base['reward']:.3f} on {base['samples']} "
        f"held-out samples), mean ± 95% t-interval over seeds {seeds}. alpha = 0 is Diffusion-DPO. "
        f"Command: `{results['command']}`.",
        "",
        *_grid_table({(c["set"], c["alpha"]): _fmt(c["gain"]) for c in stats["cells"]}, alphas),
    ]
    lines += [
        "",
        "Paired difference against alpha = 0 (same seeds):",
        "",
        "| set | " + " | ".join(f"alpha={a:g}" for a in alphas if a != 0) + " |",
        "|---|" + "---|" * (len(alphas) - 1),
    ]
    for kind in sorted({c["set"] for c in stats["cells"]}, key=SETS.index):
        cells = {d["alpha"]: _fmt(d["difference"]) for d in stats["versus_dpo"] if d["set"] == kind}
        lines.append(f"| {kind} | " + " | ".join(cells.get(a, "-") for a in alphas if a != 0) + " |")
    lines += [
        "",
        "Slope of gain per unit alpha over [-1, 1] (per-seed least squares, then mean ± 95% interval), and "
        "the verdict against the paper's Fig. 4:",
        "",
        "| set | slope | paper | verdict |",
        "|---|---|---|---|",
    ]
    for s in stats["slopes"]:
        v = results["verdicts"][s["set"]]
        lines.append(f"| {s['set']} | {_fmt(s['slope_per_unit_alpha'])} | {v['paper']} | {v['verdict']} |")
    if stats["controls"]:
        lines += [
            "",
            "Learning-rate control: Diffusion-DPO at lr x mean `1 + alpha p` of the alpha run (same seeds).",
            "",
            "| set | alpha | control lr | control gain | alpha run minus control | reading |",
            "|---|---|---|---|---|---|",
        ]
        for c in stats["controls"]:
            reading = results["verdicts"][c["set"]][f"alpha {c['alpha']:g} vs its lr control"]
            lines.append(
                f"| {c['set']} | {c['alpha']:g} | {c['mean_learning_rate']:.2e} | {_fmt(c['control_gain'])} "
                f"| {_fmt(c['alpha_minus_control'])} | {reading} |"
            )
    plan = results.get("planning")
    if plan and plan["cells"]:
        hours = plan["wall_hours_per_seed_two_workers"]
        worst = max(plan["cells"], key=lambda c: c["seeds_needed"])
        lines += [
            "",
            f"Seeds each cell would need for a 95% interval of at most ±{plan['target_half_width']:g} at its measured "
            f"seed-to-seed spread (one seed of the whole study: {hours:.2f} h of training, two runs at a time; "
            f"the widest cell, {worst['set']} alpha={worst['alpha']:g}, would need about "
            f"{worst['seeds_needed'] * hours:.0f} h):",
            "",
            *_grid_table({(c["set"], c["alpha"]): str(c["seeds_needed"]) for c in plan["cells"]}, alphas),
        ]
    sets = results["sets"]
    lines += [
        "",
        "Sets (mean over seeds): "
        + "; ".join(
            f"{kind} {_mean(sets, kind, 'pairs'):.0f} pairs, flipped {_mean(sets, kind, 'flip_rate'):.0%}, "
            f"conflicting {_mean(sets, kind, 'conflict_rate'):.0%}"
            for kind in SETS
            if any(s["set"] == kind for s in sets)
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def _grid_table(entries: dict[tuple[str, float], str], alphas: list[float]) -> list[str]:
    """A markdown table with a row per set and a column per alpha; `entries` maps (set, alpha) to the cell's text."""
    lines = ["| set | " + " | ".join(f"alpha={a:g}" for a in alphas) + " |", "|---|" + "---|" * len(alphas)]
    for kind in sorted({kind for kind, _ in entries}, key=SETS.index):
        lines.append(f"| {kind} | " + " | ".join(entries.get((kind, a), "-") for a in alphas) + " |")
    return lines


def _mean(rows: list, kind: str, key: str) -> float:
    values = [r[key] for r in rows if r["set"] == kind]
    return sum(values) / len(values)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = results["stats"]
    kinds = sorted({c["set"] for c in stats["cells"]}, key=SETS.index)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        cells = sorted((c for c in stats["cells"] if c["set"] == kind), key=lambda c: c["alpha"])
        xs = [c["alpha"] for c in cells]
        ax.errorbar(
            xs,
            [c["gain"]["mean"] for c in cells],
            yerr=[c["gain"]["half_width"] for c in cells],
            marker="o",
            capsize=3,
            label="Poly-DPO (ours)",
        )
        controls = [c for c in stats["controls"] if c["set"] == kind]
        if controls:
            ax.errorbar(
                [c["alpha"] + 0.15 for c in controls],
                [c["control_gain"]["mean"] for c in controls],
                yerr=[c["control_gain"]["half_width"] for c in controls],
                fmt="s",
                color="tab:red",
                capsize=3,
                label="DPO at matched lr",
            )
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set(
            title=f"{kind} (paper: {PAPER_DIRECTION[kind]})",
            xlabel="alpha (0 = Diffusion-DPO)",
            ylabel="reward gain over base (95% CI)",
        )
        paper = PAPER_FIG4[kind]
        twin = ax.twinx()
        twin.plot(list(paper), list(paper.values()), "--", color="tab:green", marker="x", label="paper Fig. 4")
        twin.set_ylabel("paper: HPSv2.1", color="tab:green")
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="docs/alpha_study", help="report folder; runs go to <output>/runs")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the plan's seeds (0-4)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (one per core)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per run")
    parser.add_argument("--report_only", action="store_true", help="rebuild the report from finished runs")
    parser.add_argument("--smoke", action="store_true", help="a tiny grid, 2 seeds, a small evaluation (CI)")
    args = parser.parse_args()
    plan = SMOKE if args.smoke else Plan()
    if args.seeds:
        plan = Plan(**{**plan.__dict__, "seeds": tuple(args.seeds)})
    output = Path(args.output)
    start = time.perf_counter()
    if not args.report_only:
        run_study(plan, output, args.workers, args.threads)
    report(plan, output, "python examples/alpha_ablation.py " + " ".join(sys.argv[1:]))
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min: {output / 'table.md'}")


if __name__ == "__main__":
    main()
