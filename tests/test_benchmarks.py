"""The benchmark scripts run end to end at smoke size (their figures live in benchmarks/RESULTS.md, not here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_step_smoke_measures_every_mode_and_states_each_target(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(out.read_text())
    (round_,) = summary["rounds"]
    assert set(round_) == {"reference", "full", "full_8bit", "lora", "lora_cache", "lora_cache_gc", "lora_cache_mapo"}
    for mode, figures in round_.items():
        assert figures["seconds_per_step"] > 0 and figures["peak_mb"] > 0, mode
    assert len(summary["targets"]) == 4
    assert "targets (ratio min/median/max over rounds)" in run.stdout
