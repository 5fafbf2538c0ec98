"""The QLoRA check (needs a CUDA GPU: diffusers' bitsandbytes quantizer does not run on the CPU).

Trains a LoRA with `vipo-trl train --use_peft --load_in_4bit` on the embedded model (a pair set in Pick-a-Pic v2's
schema written here: red beats blue), then checks what a user relies on:

1. the frozen base really was held in 4 bits (bitsandbytes `Linear4bit` modules in the loaded denoiser);
2. the loss was finite and the LoRA learned (its `lora_B` weights moved off their zero initialisation);
3. the saved LoRA loads with `load_lora_weights` into the official, unquantized `StableDiffusionPipeline` and
   changes its output for a fixed seed.

    python benchmarks/qlora_check.py --out /tmp/qlora

Prints one line per check and exits non-zero if one fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dry-run", action="store_true", help="CPU, no quantization: checks the script's code")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("qlora_check: needs a CUDA GPU (bitsandbytes' 4-bit quantizer does not run on the CPU).")
    device = "cpu" if args.dry_run else "cuda"

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from vipo_trl.cli.main import main as vipo_main
    from vipo_trl.default import MODEL_DIR
    from vipo_trl.models.registry import load_family
    from vipo_trl.testing import pickapic_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "pairs.parquet"
    pickapic_dataset(32).to_parquet(str(data))
    lora_dir = out / "qlora"
    argv = [
        "train",
        "--model_name_or_path", str(MODEL_DIR),
        "--dataset_name", str(data),
        "--use_peft", "--lora_r", "8", "--lora_alpha", "8",
        "--lora_target_modules", "to_q", "to_k", "to_v", "to_out.0",
        *([] if args.dry_run else ["--load_in_4bit", "--bnb_4bit_quant_type", "nf4"]),
        "--max_steps", str(args.steps), "--per_device_train_batch_size", "8",
        "--learning_rate", "1e-3", "--resolution", "32", "--beta", "2000",
        "--logging_steps", "5", "--save_strategy", "steps", "--save_steps", str(args.steps), "--report_to", "none",
        "--output_dir", str(lora_dir),
    ]  # fmt: skip
    results: dict[str, object] = {"device": "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(0)}
    failures = []

    # 1. the base is held in 4 bits when loaded the way the trainer loads it
    from trl import ModelConfig, get_quantization_config

    if not args.dry_run:
        quant = get_quantization_config(ModelConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
        family = load_family(str(MODEL_DIR), quantization_config=quant)
        n4 = sum(type(m).__name__ == "Linear4bit" for m in family.denoiser.modules())
        results["linear4bit_modules"] = n4
        results["denoiser_bytes_4bit"] = sum(p.numel() * p.element_size() for p in family.denoiser.parameters())
        if n4 == 0:
            failures.append("no Linear4bit module in the quantized denoiser")
        del family

    # 2. train through the command line, as a user would
    vipo_main(argv)
    states = sorted(lora_dir.glob("checkpoint-*/trainer_state.json"))
    state = json.loads(states[-1].read_text()) if states else None
    lora_file = lora_dir / "pytorch_lora_weights.safetensors"
    weights = load_file(str(lora_file))
    b_norm = sum(float(v.float().norm()) for k, v in weights.items() if "lora_B" in k or "lora.up" in k)
    results["lora_tensors"] = len(weights)
    results["lora_B_norm"] = b_norm
    if state:
        results["losses"] = [h["loss"] for h in state["log_history"] if "loss" in h]
    if b_norm == 0:
        failures.append("the LoRA's B weights never moved off zero")

    # 3. the LoRA loads into the official, unquantized pipeline and changes its output
    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, safety_checker=None, requires_safety_checker=False)
    pipe.to(device).set_progress_bar_config(disable=True)

    def sample() -> torch.Tensor:
        g = torch.Generator(device).manual_seed(0)
        return pipe("a red square", num_inference_steps=10, generator=g, output_type="pt").images.float().cpu()

    before = sample()
    pipe.load_lora_weights(str(lora_dir))
    after = sample()
    results["image_change_max_abs"] = float((after - before).abs().max())
    if not results["image_change_max_abs"] > 1e-3:
        failures.append("loading the LoRA did not change the pipeline's output")

    results["failures"] = failures
    print(json.dumps(results, indent=1))
    (out / "qlora_check.json").write_text(json.dumps(results, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
