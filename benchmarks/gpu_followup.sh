#!/usr/bin/env bash
# The GPU figures still open (benchmarks/RESULTS.md), in order of importance, each under its own time limit:
#   bash benchmarks/gpu_followup.sh            # 1 + 2, at most 8.5 minutes (timeout_s 560)
#   bash benchmarks/gpu_followup.sh compile    # 3, in a second call if device time remains
# 1. PolyDPOTrainer against the diffusers-style LoRA loop at SD1.5 size (bench_step.py, bf16, 512 px; 1.18x slower on
#    2026-11-27, before the VAE ran in bf16, before the per-step unwrap/dtype walks went, before the CPU-drawn noise,
#    timesteps and time ids were copied to the GPU without blocking, and before the reference switch stopped walking
#    every module: 12 ms of host time a step at this size), and with images decoded by DataLoader workers.
# 2. Both under the profiler, the steps after warm-up only (profile_step.py): per step, cudaStreamSynchronize calls
#    and device time by operator, to see what is left of the gap.
# 3. torch.compile at SDXL size.
# Expects the packages missing on the machine as wheels in .whl/ (see /work/.library/device/README.md); writes logs
# and JSON to $OUT.
set -u
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh
quiet() { grep -v "should be kept in float32\|it/s\]\|examples/s\]\|FutureWarning\|deprecate(" ; }
part=${1:-all}
if [ "$part" = all ]; then
  timeout "${BENCH_LIMIT:-300}" python3 benchmarks/bench_step.py --size sd15 --device cuda --bf16 --resolution 512 \
    --batch 4 --steps 8 --repeats 2 --modes lora diffusers_lora lora_workers --json "$OUT/bench_step_sd15_cuda.json" \
    2>&1 | quiet | tail -20 | tee "$OUT/bench_step.log"
  timeout "${PROFILE_LIMIT:-200}" python3 benchmarks/profile_step.py --size sd15 --device cuda --bf16 --resolution 512 \
    --batch 4 --steps 3 --rows 30 2>&1 | quiet > "$OUT/profile_sd15.log"
  grep -A3 "^=== \|cudaStreamSynchronize" "$OUT/profile_sd15.log" | head -40
fi
if [ "$part" = compile ]; then
  timeout "${COMPILE_LIMIT:-400}" python3 benchmarks/gpu_check.py --no-write --sizes sdxl --modes plain compile \
    --jsonl "$OUT/gpu_check.jsonl" --steps 5 2>&1 | quiet | tail -30 | tee "$OUT/compile.log"
fi
echo "gpu_followup $part done"
