#!/usr/bin/env bash
# One lent-GPU session's checks, in order of importance, each under its own time limit so the machine's budget holds:
# the QLoRA check (issue 14), then the GPU check (issue 15). Expects the packages missing on the machine as wheels
# in .whl/ (see /work/.library/device/README.md) and writes logs and JSON results to $OUT.
set -u
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh
timeout "${QLORA_LIMIT:-150}" python3 benchmarks/qlora_check.py --out /tmp/qlora 2>&1 | grep -v "it/s\]" | tail -40 > "$OUT/qlora.log"
cp /tmp/qlora/qlora_check.json "$OUT/" 2>/dev/null
tail -25 "$OUT/qlora.log"
# one process per model size: a CUDA error (which leaves the context unusable) costs only that size's other modes
for size in sd15 sdxl flux; do
  limit=${GPU_CHECK_LIMIT:-120}
  modes="plain checkpointing adamw8bit compile"
  extra=""
  # torch 2.11's cuDNN attention hit an illegal memory access at FLUX.1 size (benchmarks/RESULTS.md)
  [ "$size" = flux ] && modes="checkpointing plain adamw8bit compile" && extra="--no-cudnn-attention"
  timeout "$limit" python3 benchmarks/gpu_check.py --no-write --sizes $size --modes $modes $extra \
    --jsonl "$OUT/gpu_check.jsonl" --steps 5 2>&1 | grep -v "should be kept in float32" | tee -a "$OUT/gpu_check.log"
done
echo "gpu_session done"
