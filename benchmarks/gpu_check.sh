#!/usr/bin/env bash
# The GPU check (issue 15): bf16 LoRA steps at SD1.5, SDXL and FLUX.1 size, plain, with gradient checkpointing,
# torch.compile and 8-bit AdamW; appends the table to benchmarks/RESULTS.md with the device named.
#   bash benchmarks/gpu_check.sh            # on a CUDA machine
#   bash benchmarks/gpu_check.sh --dry-run  # tiny models on the CPU, one step each (run in CI)
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/gpu_check.py "$@"
