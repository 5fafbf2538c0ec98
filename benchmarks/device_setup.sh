# Sourced by the lent-GPU scripts (gpu_session.sh, gpu_followup.sh): installs the packages the device machine lacks
# from the wheels in .whl/ (see /work/.library/device/README.md), sets the environment, creates $OUT and prints the
# device and the package versions.
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers, transformers, peft, trl, datasets, bitsandbytes; print({m.__name__: m.__version__ for m in (torch, diffusers, transformers, peft, trl, datasets, bitsandbytes)})"
