#!/usr/bin/env bash
# The GPU figures still open after two lent sessions (benchmarks/RESULTS.md), in order of importance, each under its
# own time limit: PolyDPOTrainer against the diffusers-style LoRA loop at SD1.5 size on the GPU (bench_step.py, bf16,
# 512 px; 1.18x slower on 2026-11-27 before the VAE ran in bf16), with images decoded by DataLoader workers, then
# torch.compile at SDXL size. Expects the packages missing on the machine as wheels in .whl/ (see
# /work/.library/device/README.md); writes logs and JSON to $OUT.
set -u
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh
quiet() { grep -v "should be kept in float32\|it/s\]\|examples/s\]\|FutureWarning\|deprecate(" ; }
timeout "${BENCH_LIMIT:-300}" python3 benchmarks/bench_step.py --size sd15 --device cuda --bf16 --resolution 512 \
  --batch 4 --steps 8 --repeats 2 --modes lora diffusers_lora lora_workers --json "$OUT/bench_step_sd15_cuda.json" \
  2>&1 | quiet | tail -20 | tee "$OUT/bench_step.log"
timeout "${COMPILE_LIMIT:-240}" python3 benchmarks/gpu_check.py --no-write --sizes sdxl --modes plain compile \
  --jsonl "$OUT/gpu_check.jsonl" --steps 5 2>&1 | quiet | tail -30 | tee "$OUT/compile.log"
echo "gpu_followup done"
