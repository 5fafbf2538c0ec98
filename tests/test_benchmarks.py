"""The benchmark scripts run end to end at smoke size (their figures live in benchmarks/RESULTS.md, not here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `benchmarks/<script>` with `args` in a fresh interpreter; fail the test with its stderr if it fails."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True, timeout=timeout
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.slow
def test_bench_step_smoke_measures_every_mode_and_states_each_target(tmp_path):
    out = tmp_path / "bench.json"
    run = run_benchmark("bench_step.py", "--smoke", "--json", str(out), timeout=900)
    summary = json.loads(out.read_text())
    (round_,) = summary["rounds"]
    assert set(round_) == {
        "reference",
        "full",
        "full_8bit",
        "lora",
        "lora_cache",
        "lora_cache_gc",
        "lora_cache_mapo",
        "lora_cache_sft",
        "diffusers_lora",
    }
    for mode, figures in round_.items():
        assert figures["seconds_per_step"] > 0 and figures["peak_mb"] > 0, mode
    assert len(summary["targets"]) == 8
    assert "targets (ratio min/median/max over rounds)" in run.stdout


def test_the_diffusers_style_loop_and_the_trainer_step_an_sdxl_pipeline(tmp_path, monkeypatch):
    """bench_step's `--size sdxl` path on a tiny SDXL: the loop conditions the UNet as diffusers' SDXL DPO script does
    (2048-wide text states from both encoders, pooled embeddings and six time ids) and the trainer steps the same."""
    import argparse

    from diffusers import UNet2DConditionModel

    from vipo_trl.testing import sdxl_pipeline

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_step
    from common import pickapic_pairs

    sdxl_pipeline().save_pretrained(tmp_path / "model")
    pickapic_pairs(8, 64).save_to_disk(str(tmp_path / "data"))
    opts = argparse.Namespace(
        model=str(tmp_path / "model"), data=str(tmp_path / "data"), cache=None, device="cpu", bf16=False, steps=1,
        batch=2, resolution=32, lora_r=4,
    )  # fmt: skip
    seen = []
    forward = UNet2DConditionModel.forward

    def recording(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kwargs):
        seen.append((encoder_hidden_states.shape, {k: v.shape for k, v in (added_cond_kwargs or {}).items()}))
        return forward(
            self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs, **kwargs
        )

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    stamps, _ = bench_step.reference_loop(opts, lora=True)
    assert len(stamps) == 3 and len(seen) == 6  # 3 steps, a policy and a reference forward each
    hidden, added = seen[0]
    width = 2 * 32  # the tiny pipeline's two text encoders are 32 wide each
    assert hidden[0] == 4 and hidden[-1] == width and added == {"text_embeds": (4, 32), "time_ids": (4, 6)}
    stamps, _ = bench_step.trainer_run("lora", opts)
    assert len(stamps) == 3


def test_profile_step_prints_each_modes_operators_over_the_steps_after_warm_up():
    """Loading and warm-up are left out of every mode's profile (else the first mode is billed for one-off costs)."""
    run = run_benchmark("profile_step.py", "--smoke", "--rows", "5", timeout=600)
    for mode in ("lora", "diffusers_lora"):
        section = run.stdout.split(f"=== {mode}:")[1].split("===")[0]
        assert "s/step under the profiler (2 steps recorded, after warm-up)" in section, mode
        assert "aten::" in section, mode


def test_bench_data_times_the_trainers_data_path_against_the_loops(tmp_path):
    out = tmp_path / "data.json"
    run = run_benchmark("bench_data.py", "--smoke", "--json", str(out), timeout=300)
    (figures,) = json.loads(out.read_text())["rounds"]
    assert figures["trainer"] > 0 and figures["loop"] > 0
    assert "trainer/loop min" in run.stdout


def test_gpu_check_builds_the_published_sizes_and_dry_runs():
    """The real-size configs give the published parameter counts (built on the meta device: nothing allocated), and
    `gpu_check.sh --dry-run` runs every mode on tiny versions of the same models on the CPU."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    published = {"sd15": 859.52, "sdxl": 2567.46, "flux": 11901.41}  # millions of parameters
    for size, millions in published.items():
        with torch.device("meta"):
            net, _, _ = gpu_check.build(size, tiny=False)
        assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(millions, abs=0.01)
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        line
        for line in result.stdout.splitlines()
        if line.startswith("| sd15") or line.startswith("| sdxl") or line.startswith("| flux")
    ]
    assert len(rows) == 12
    skipped = [row for row in rows if "skipped" in row]
    assert all("| compile |" in row for row in skipped) and len(skipped) == 3  # every other mode really ran


def test_qlora_check_runs_its_code_on_the_cpu(tmp_path):
    """`qlora_check.py --dry-run` (no quantization: bitsandbytes' 4-bit layers need CUDA) trains through the command
    line, loads the LoRA into the official pipeline and finds its output changed, so the GPU script is ready."""
    script = ROOT / "benchmarks" / "qlora_check.py"
    run = subprocess.run(
        [sys.executable, str(script), "--dry-run", "--steps", "3", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "qlora_check.json").read_text())
    assert result["failures"] == [] and result["lora_B_norm"] > 0 and result["image_change_max_abs"] > 1e-3


def test_bench_adapter_switch_times_both_switches_after_checking_they_agree(monkeypatch):
    """Both ways of switching to the reference leave every LoRA layer in the same state (the script checks it before
    timing); the figures come out for both references."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from bench_adapter_switch import measure

    for reference_adapter in (False, True):
        row = measure("sd15", tiny=True, reference_adapter=reference_adapter, rounds=1, switches=2)
        assert row["lora_layers"] == 128 and row["trainer_ms_per_step"] > 0 and row["diffusers_ms_per_step"] > 0
