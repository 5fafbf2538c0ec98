"""Every example's --smoke run, as a user would start it."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))


def run_example(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run `examples/<script>` with `args` in a fresh interpreter, as a user would; fail the test with its stderr if
    it fails."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_example_config_smoke(config, monkeypatch, capsys):
    # In this interpreter (its `__main__` block, with the user's argv): a fresh one would spend ~8 s of each ~9.5 s
    # importing torch, diffusers and bitsandbytes; `run_example` keeps the fresh-interpreter path for the studies.
    monkeypatch.setattr(sys, "argv", ["train.py", str(config), "--smoke"])
    runpy.run_path(str(ROOT / "examples" / "train.py"), run_name="__main__")
    out = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("done: "))
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_compare_losses_smoke(tmp_path):
    run_example("compare_losses.py", "--smoke", "--output", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"dpo", "diffusion_dpo", "poly_dpo", "mapo", "kto"}
    # "dpo" is an alias of Diffusion-DPO: same seed, same batches, so the same run.
    assert results["dpo"]["accuracy"] == results["diffusion_dpo"]["accuracy"]
    assert results["dpo"]["final_train_loss"] == pytest.approx(results["diffusion_dpo"]["final_train_loss"])
    assert (tmp_path / "comparison.png").stat().st_size > 10_000
    assert "| poly_dpo |" in (tmp_path / "table.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comparison.png", "results.json", "table.md"]  # nothing else


@pytest.mark.slow
def test_compare_losses_on_the_embedded_model_scores_each_run(tmp_path):
    """--embedded: the embedded model on its clean set, each run's shapes-reward gain over the base model and its
    paired difference against Diffusion-DPO (a small run: 2 losses, 3 steps, 48 held-out samples)."""
    run_example(
        "compare_losses.py", "--embedded", "--losses", "diffusion_dpo", "mapo", "--max_steps", "3",
        "--samples_per_prompt", "2", "--eval_seeds", "10001", "--output", str(tmp_path),
    )  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"diffusion_dpo", "mapo"}
    for summary in results.values():
        (run,) = summary["runs"]
        assert summary["reward_gain"] == {"mean": run["reward_gain"], "half_width": None, "n": 1}
        assert -1 <= run["reward_gain"] <= 1 and run["reward_gain"] * 144 == pytest.approx(
            round(run["reward_gain"] * 144)
        )
    assert results["diffusion_dpo"]["reward_gain_vs_diffusion_dpo"]["mean"] == 0
    expected = results["mapo"]["runs"][0]["reward_gain"] - results["diffusion_dpo"]["runs"][0]["reward_gain"]
    assert results["mapo"]["reward_gain_vs_diffusion_dpo"]["mean"] == pytest.approx(expected)
    table = (tmp_path / "table.md").read_text()
    assert "reward gain over base | vs Diffusion-DPO |" in table and "embedded default, clean set" in table


def test_compare_losses_summary_is_paired_over_seeds():
    """Two seeds by hand: gains (0.10, 0.30) against Diffusion-DPO's (0.05, 0.15): mean gain 0.20, interval
    t(1) x sd / sqrt(2) = 12.706 x 0.14142 / 1.41421 = 1.2706; paired differences (0.05, 0.15): mean 0.10, half
    width 12.706 x 0.07071 / 1.41421 = 0.6353 (unpaired it would be wider)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_losses", ROOT / "examples" / "compare_losses.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(seed, gain, accuracy):
        return {"seed": seed, "reward_gain": gain, "accuracy": accuracy, "margin": 0.0, "final_train_loss": 1.0,
                "curve": [(1, 1.0)]}  # fmt: skip

    reference = [run(0, 0.05, 0.5), run(1, 0.15, 0.7)]
    summary = module._summary([run(0, 0.10, 0.6), run(1, 0.30, 0.8)], reference)
    assert summary["reward_gain"]["mean"] == pytest.approx(0.20)
    assert summary["reward_gain"]["half_width"] == pytest.approx(1.2706, abs=1e-4)
    assert summary["reward_gain_vs_diffusion_dpo"]["mean"] == pytest.approx(0.10)
    assert summary["reward_gain_vs_diffusion_dpo"]["half_width"] == pytest.approx(0.6353, abs=1e-4)
    assert summary["accuracy"] == pytest.approx(0.7) and summary["seeds"] == [0, 1]


@pytest.mark.slow
def test_robust_study_smoke_trains_robust_dpo_and_its_control_and_resumes(tmp_path):
    command = ("robust_study.py", "--smoke", "--output", str(tmp_path))
    run_example(*command)
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {r["arm"]: r for r in results["runs"]}
    assert set(runs) == {"dpo", "robust0.1", "control0.1"} and not results["check"]["reused_alpha_study"]
    assert runs["robust0.1"]["loss"] == {"loss_type": "robust", "label_smoothing": 0.1}
    assert runs["control0.1"]["learning_rate"] == pytest.approx(3e-3 / 0.8) and "loss" not in runs["control0.1"]
    (arm,) = results["stats"]["arms"]
    base = results["base"]["reward"]
    assert arm["robust_minus_dpo"]["mean"] == pytest.approx(runs["robust0.1"]["reward"] - runs["dpo"]["reward"])
    assert arm["robust_gain"]["mean"] == pytest.approx(runs["robust0.1"]["reward"] - base)
    assert "| robust, label_smoothing 0.1 | 0.003 |" in (tmp_path / "table.md").read_text()
    again = run_example(*command)  # resumable: nothing reruns
    assert "running 0 runs" in again.stdout, again.stdout[-2000:]


@pytest.mark.slow
def test_alpha_ablation_smoke(tmp_path):
    """The study's smoke grid (2 seeds, alpha 0 and 1, one learning-rate control) runs, resumes and reports."""
    command = ("alpha_ablation.py", "--smoke", "--output", str(tmp_path))
    run_example(*command)
    results = json.loads((tmp_path / "results.json").read_text())
    runs = results["runs"]
    arms = {(r["set"], r["seed"], r["alpha"], r["arm"]) for r in runs}
    assert arms == {(s, seed, a, "poly_dpo") for s in ("clean", "noisy") for seed in (0, 1) for a in (0.0, 1.0)} | {
        (s, seed, 0.0, "lr_control") for s in ("clean", "noisy") for seed in (0, 1)
    }
    for control in (r for r in runs if r["arm"] == "lr_control"):
        matched = next(
            r
            for r in runs
            if (r["set"], r["seed"], r["alpha"], r["arm"]) == (control["set"], control["seed"], 1.0, "poly_dpo")
        )
        assert matched["grad_scale"] > 1.0  # 1 + alpha p with alpha 1
        assert control["learning_rate"] == pytest.approx(3e-3 * matched["grad_scale"])
    stats = results["stats"]
    cell = next(c for c in stats["cells"] if c["set"] == "clean" and c["alpha"] == 1.0)
    gains = [r["gain"] for r in runs if (r["set"], r["alpha"], r["arm"]) == ("clean", 1.0, "poly_dpo")]
    assert cell["gain"]["mean"] == pytest.approx(sum(gains) / 2) and cell["gain"]["n"] == 2
    assert {c["set"] for c in stats["controls"]} == {"clean", "noisy"} and len(stats["slopes"]) == 2
    assert set(results["verdicts"]) == {"clean", "noisy"}
    assert {(c["set"], c["alpha"]) for c in results["planning"]["cells"]} == {
        (s, a) for s in ("clean", "noisy") for a in (0.0, 1.0)
    }
    table = (tmp_path / "table.md").read_text()
    assert "Learning-rate control" in table and "| noisy |" in table and "would need" in table
    assert (tmp_path / "alpha_study.png").stat().st_size > 10_000
    # Resumable: a second call finds every run done and only rebuilds the report.
    again = run_example(*command)
    assert "running 0" in again.stdout, again.stdout[-2000:]


def test_alpha_ablation_seeds_needed_for_the_interval_target():
    """Hand-computed: gains 0 and 0.02 have sd 0.01414; the normal bound says 8 seeds, t(n-1) * sd / sqrt(n) first
    falls to 0.01 at n = 11 (t(9) * sd / sqrt(10) = 0.0101, t(10) * sd / sqrt(11) = 0.0095)."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from alpha_ablation import seeds_needed
    finally:
        sys.path.pop(0)
    assert seeds_needed([0.0, 0.02]) == 11
    assert seeds_needed([0.0, 0.02], target=0.1) == 3  # n = 2: t(1) = 12.7 gives 0.127; n = 3: 0.035
    assert seeds_needed([0.01, 0.01, 0.01]) == 2  # no spread: the fewest seeds an interval needs


@pytest.mark.slow
def test_alignment_rounds_smoke(tmp_path):
    """Both rounds and the control run through the public API, and a finished seed is kept on a rerun."""
    command = ("alignment_rounds.py", "--smoke", "--output_dir", str(tmp_path))
    run_example(*command)
    (run,) = json.loads((tmp_path / "results.json").read_text())
    assert run["seed"] == 0 and run["steps_per_round"] == 2 and run["eval_seeds"] == [10_001]
    assert run["pairs_round1"] > 0 and run["pairs_round2"] > 0
    for key in ("base", "round1", "round2", "round1_twice_the_steps"):
        assert 0.0 <= run[key] <= 1.0
    for lora in ("lora1", "lora2", "lora1_long"):
        assert (tmp_path / "work" / "seed0" / lora / "pytorch_lora_weights.safetensors").is_file()
    assert "| 0 |" in (tmp_path / "table.md").read_text()
    again = run_example(*command)
    assert "seed 0: done earlier, kept" in again.stdout, again.stdout[-3000:]
    assert len(json.loads((tmp_path / "results.json").read_text())) == 1
