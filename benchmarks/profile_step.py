"""Where a training step's time goes: bench_step.py's modes (PolyDPOTrainer, the diffusers-style LoRA loop, ...) run
one after another in this process under `torch.profiler`, and the top operators by device time and by CPU time are
printed per mode. Only the steps after the two warm-up steps are recorded: loading, the first kernels' lazy loading
and cuDNN's per-shape plan building fall in the first mode's warm-up, which would otherwise bill them to whichever
mode runs first.

    python benchmarks/profile_step.py --size sd15 --device cuda --bf16 --resolution 512 --batch 4
    python benchmarks/profile_step.py --steps 4            # CPU, small config
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402
from common import pickapic_pairs, sd15_sized, small_sd  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["small", "sd15"], default="small")
    parser.add_argument("--smoke", action="store_true", help="a tiny config, 2 steps, 64 px: checks it all runs")
    parser.add_argument("--modes", nargs="+", default=["lora", "diffusers_lora"], choices=list(bench_step.MODES))
    parser.add_argument("--steps", type=int, default=4, help="profiled steps per mode (after 2 warm-up steps)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--rows", type=int, default=25, help="operators printed per table")
    opts = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    if opts.smoke:
        opts.steps, opts.batch, opts.resolution = 2, 2, 64
    opts.device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp())
    opts.model, opts.data, opts.cache = str(work / "model"), str(work / "data"), None
    if opts.size == "sd15":
        sd15_sized(opts.model)
    else:
        small_sd(opts.model, unet_width=16 if opts.smoke else 64, unet_levels=2 if opts.smoke else 3)
    pickapic_pairs(max(4 * opts.batch, 16), opts.resolution * 2).save_to_disk(opts.data)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if opts.device == "cuda" else [])
    sort = "self_cuda_time_total" if opts.device == "cuda" else "self_cpu_time_total"
    for mode in opts.modes:
        torch.manual_seed(0)
        # Both loops run 2 warm-up steps and then opts.steps: record only the latter.
        steps = schedule(wait=1, warmup=1, active=opts.steps, repeat=1)
        with profile(activities=activities, schedule=steps) as prof:
            if mode in ("reference", "diffusers_lora"):
                stamps, _ = bench_step.reference_loop(opts, lora=mode == "diffusers_lora", on_step=prof.step)
            else:
                stamps, _ = bench_step.trainer_run(mode, opts, on_step=prof.step)
        per_step = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
        operators = prof.key_averages()
        recorded = sum(e.count for e in operators if e.key.startswith("ProfilerStep"))
        print(f"\n=== {mode}: {per_step:.3f} s/step under the profiler ({recorded} steps recorded, after warm-up)")
        print(operators.table(sort_by=sort, row_limit=opts.rows))
        if opts.device == "cuda":
            print(operators.table(sort_by="self_cpu_time_total", row_limit=opts.rows))


if __name__ == "__main__":
    main()
