"""Where a training step's time goes: bench_step.py's modes (PolyDPOTrainer, the diffusers-style LoRA loop, ...) run
one after another in this process under `torch.profiler`, with the steps marked, and the top operators by device time
and by CPU time printed per mode; with `--phases`, the wall time of each phase of the step (data, encode, forwards,
backward, optimizer) measured with device synchronisation around it.

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
    parser.add_argument("--smoke", action="store_true", help="a tiny config, 1 step, 64 px: checks it all runs")
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
    from torch.profiler import ProfilerActivity, profile

    if opts.smoke:
        opts.steps, opts.batch, opts.resolution = 1, 2, 64
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
        with profile(activities=activities) as prof:
            if mode in ("reference", "diffusers_lora"):
                stamps, _ = bench_step.reference_loop(opts, lora=mode == "diffusers_lora")
            else:
                stamps, _ = bench_step.trainer_run(mode, opts)
        per_step = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
        print(f"\n=== {mode}: {per_step:.3f} s/step under the profiler ({len(stamps) - 2} steps after warm-up)")
        print(prof.key_averages().table(sort_by=sort, row_limit=opts.rows))
        if opts.device == "cuda":
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=opts.rows))


if __name__ == "__main__":
    main()
