"""Robust DPO against Diffusion-DPO on the embedded default's noisy set, with learning-rate controls.

    python examples/robust_study.py                    # the study (docs/robust_study.md); resumable
    python examples/robust_study.py --smoke --output /tmp/robust-smoke

The design is in docs/robust_study.md, fixed before any run: the alpha study's `noisy` set and run settings
(examples/alpha_ablation.py, whose set, training and evaluation tasks this script runs), `loss_type="robust"` at
`label_smoothing` 0.1 and 0.3, each with a Diffusion-DPO control at the learning rate scaled by `1 / (1 - 2 eps)`, and
Diffusion-DPO itself: the alpha study's stored alpha-0 runs, reused only if seed 0's rerun reproduces its reward
exactly, else rerun for every seed. Every finished run is a JSON file under `<output>/runs/`; the report
(`results.json`, `table.md`) is rebuilt from them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import alpha_ablation as study  # noqa: E402

EPSILONS = (0.1, 0.3)
SEEDS = (0, 1, 2, 3, 4)
ALPHA_STUDY_RUNS = Path(__file__).resolve().parents[1] / "docs" / "alpha_study" / "runs"


def _submit_all(pool, jobs: list) -> list:
    """Run the `(function, args, result_file)` jobs whose file does not exist yet; return their results."""
    futures = [pool.submit(fn, *args) for fn, args, path in jobs if not Path(path).is_file()]
    return [f.result() for f in futures]  # a failed run stops the study with its error


def run(plan: study.Plan, output: Path, epsilons: tuple[float, ...], baseline: Path | None, workers: int) -> None:
    work = output / "runs"
    for sub in ("sets", "arms", "cache", "models"):
        (work / sub).mkdir(parents=True, exist_ok=True)

    def arm_file(seed: int, name: str) -> Path:
        return work / "arms" / f"noisy-seed{seed}-{name}.json"

    def train(seed: int, name: str, lr: float, loss: dict | None, matched: float | None = None):
        path = str(arm_file(seed, name))
        return study.task_train, (plan, "noisy", seed, 0.0, lr, name, str(work), path, matched, loss), path

    start = time.perf_counter()
    with ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=study._worker_init, initargs=(1,)
    ) as pool:
        sets = [str(work / "sets" / f"noisy-seed{seed}.json") for seed in plan.seeds]
        _submit_all(pool, [(study.task_set, (plan, "noisy", s, str(work), p), p) for s, p in zip(plan.seeds, sets)])
        print(f"sets ready ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
        first = plan.seeds[0]
        _submit_all(pool, [train(first, "dpo", study.LEARNING_RATE, None)])  # the reproducibility check
        rerun = json.loads(arm_file(first, "dpo").read_text())["reward"]
        stored_file = baseline / "arms" / f"noisy-seed{first}-alpha0-poly_dpo.json" if baseline else None
        stored = json.loads(stored_file.read_text())["reward"] if stored_file and stored_file.is_file() else None
        reuse = stored is not None and rerun == stored
        print(f"seed {first} Diffusion-DPO reward: rerun {rerun!r}, alpha study {stored!r} -> reuse: {reuse}")
        jobs = []
        for seed in plan.seeds:
            for eps in epsilons:
                jobs.append(train(seed, f"robust{eps:g}", study.LEARNING_RATE, robust(eps)))
                jobs.append(train(seed, f"control{eps:g}", study.LEARNING_RATE / (1 - 2 * eps), None, eps))
            if not reuse:
                jobs.append(train(seed, "dpo", study.LEARNING_RATE, None))
        if not reuse:
            jobs.append((study.task_base, (plan, str(work / "base.json")), str(work / "base.json")))
        print(f"running {sum(not Path(p).is_file() for *_, p in jobs)} runs, {workers} at a time", flush=True)
        _submit_all(pool, jobs)
    (work / "baseline.json").write_text(json.dumps({"reused_alpha_study": reuse, "rerun": rerun, "stored": stored}))
    print(f"runs done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)


def robust(eps: float) -> dict:
    return {"loss_type": "robust", "label_smoothing": eps}


def collect(plan: study.Plan, output: Path, baseline: Path | None) -> dict:
    """Every run's result; Diffusion-DPO's from the alpha study when the reproducibility check allowed it."""
    work = output / "runs"
    check = json.loads((work / "baseline.json").read_text())
    source = baseline if check["reused_alpha_study"] else work
    base = json.loads((source / "base.json").read_text())
    runs = {}
    for seed in plan.seeds:
        if check["reused_alpha_study"]:
            runs[("dpo", seed)] = json.loads((source / "arms" / f"noisy-seed{seed}-alpha0-poly_dpo.json").read_text())
        else:
            runs[("dpo", seed)] = json.loads((work / "arms" / f"noisy-seed{seed}-dpo.json").read_text())
        for path in (work / "arms").glob(f"noisy-seed{seed}-*.json"):
            name = path.stem.split("-", 2)[2]
            if name != "dpo":
                runs[(name, seed)] = json.loads(path.read_text())
    sets = [json.loads((work / "sets" / f"noisy-seed{s}.json").read_text()) for s in plan.seeds]
    return {"check": check, "base": base, "sets": sets, "runs": runs}


def statistics(collected: dict, epsilons: tuple[float, ...], seeds: tuple[int, ...]) -> dict:
    from vipo_trl.eval import mean_interval

    base, runs = collected["base"]["reward"], collected["runs"]

    def gains(name):
        return [runs[(name, s)]["reward"] - base for s in seeds]

    dpo = gains("dpo")
    stats = {"dpo": mean_interval(dpo).to_dict(), "arms": []}
    for eps in epsilons:
        r, c = gains(f"robust{eps:g}"), gains(f"control{eps:g}")
        versus_dpo = mean_interval([a - b for a, b in zip(r, dpo)]).to_dict()
        versus_control = mean_interval([a - b for a, b in zip(r, c)]).to_dict()
        stats["arms"].append(
            {
                "label_smoothing": eps,
                "robust_gain": mean_interval(r).to_dict(),
                "control_learning_rate": study.LEARNING_RATE / (1 - 2 * eps),
                "control_gain": mean_interval(c).to_dict(),
                "robust_minus_dpo": versus_dpo,
                "robust_minus_control": versus_control,
                "verdict_vs_dpo": _verdict(versus_dpo, "beats Diffusion-DPO", "is worse than Diffusion-DPO"),
                "verdict_vs_control": _verdict(
                    versus_control, "robust better", "control better", "not distinguishable from a learning-rate change"
                ),
            }
        )
    return stats


def _verdict(interval: dict, above: str, below: str, neither: str = "not distinguishable") -> str:
    return above if interval["low"] > 0 else below if interval["high"] < 0 else neither


def report(plan: study.Plan, output: Path, epsilons: tuple[float, ...], baseline: Path | None, command: str) -> dict:
    collected = collect(plan, output, baseline)
    stats = statistics(collected, epsilons, plan.seeds)
    fmt = study._fmt
    flips = [s["flip_rate"] for s in collected["sets"]]
    agree = [s.get("agrees_with_reward") for s in collected["sets"]]
    source = (
        "the alpha study's runs (the seed-0 rerun reproduced its reward exactly)"
        if collected["check"]["reused_alpha_study"]
        else "reruns (the alpha study's runs were not reproduced, or not given)"
    )
    lines = [
        f"Noisy set, seeds {list(plan.seeds)} ({len(plan.seeds)} paired seeds); base reward "
        f"{collected['base']['reward']:.4f}; flips injected {min(flips):.3f}-{max(flips):.3f}, labels agreeing with "
        f"the reward {min(agree):.3f}-{max(agree):.3f}. Diffusion-DPO: {source}.",
        "",
        "| arm | learning rate | gain over base (95% CI) | minus Diffusion-DPO (paired) | verdict |",
        "|---|---|---|---|---|",
        f"| Diffusion-DPO | {study.LEARNING_RATE:g} | {fmt(stats['dpo'])} | - | - |",
    ]
    for arm in stats["arms"]:
        eps = arm["label_smoothing"]
        lines.append(
            f"| robust, label_smoothing {eps:g} | {study.LEARNING_RATE:g} | {fmt(arm['robust_gain'])} | "
            f"{fmt(arm['robust_minus_dpo'])} | {arm['verdict_vs_dpo']} |"
        )
        lines.append(
            f"| control: Diffusion-DPO at lr / (1 - 2 x {eps:g}) | {arm['control_learning_rate']:g} | "
            f"{fmt(arm['control_gain'])} | - | robust minus control {fmt(arm['robust_minus_control'])}: "
            f"{arm['verdict_vs_control']} |"
        )
    table = "\n".join(lines) + "\n"
    output.mkdir(parents=True, exist_ok=True)
    (output / "table.md").write_text(table)
    runs = [{**v, "arm": k[0], "seed": k[1]} for k, v in collected["runs"].items()]  # Diffusion-DPO as "dpo"
    results = {**{k: v for k, v in collected.items() if k != "runs"}, "runs": runs, "stats": stats, "command": command}
    (output / "results.json").write_text(json.dumps(results, indent=1))
    print(table)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="docs/robust_study", help="report folder; runs go to <output>/runs")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (one per core)")
    parser.add_argument("--report_only", action="store_true", help="rebuild the report from finished runs")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 3 steps, a small evaluation (CI)")
    args = parser.parse_args()
    if args.smoke:
        plan, epsilons, baseline = (
            study.Plan(**{**study.SMOKE.__dict__, "sets": ("noisy",), "seeds": (0,)}),
            (0.1,),
            None,
        )
    else:
        plan, epsilons, baseline = study.Plan(sets=("noisy",), seeds=SEEDS), EPSILONS, ALPHA_STUDY_RUNS
    output = Path(args.output)
    start = time.perf_counter()
    if not args.report_only:
        run(plan, output, epsilons, baseline, args.workers)
    report(plan, output, epsilons, baseline, "python examples/robust_study.py " + " ".join(sys.argv[1:]))
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min: {output / 'table.md'}")


if __name__ == "__main__":
    main()
