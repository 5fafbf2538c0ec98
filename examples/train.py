"""Run one of the example configs:

    python examples/train.py examples/configs/sdxl_pickapic.yaml            # the real thing, on GPUs
    python examples/train.py examples/configs/sdxl_pickapic.yaml --smoke    # a 2-step run on tiny components, CPU

Extra flags are passed to `vipo-trl train` and override the file (`--max_steps 100`). Under several GPUs:
`accelerate launch --config_file examples/accelerate/ddp.yaml examples/train.py <config>`.

`--smoke` keeps every key of the config (so a misspelt key still fails) but swaps the model for a tiny pipeline of
the same family, the dataset for a few synthetic pairs, and the budget for two CPU steps.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml

from vipo_trl.cli import main as vipo_trl

# The family of each example's model, for --smoke.
FAMILY_OF_MODEL = {
    "stable-diffusion-v1-5": "sd",
    "stable-diffusion-xl": "sdxl",
    "stable-diffusion-3.5": "sd35",
    "stable-diffusion-3": "sd3",
    "FLUX.1": "flux",
    "Wan2.1": "wan",
}
SMOKE = {
    "sd": {"resolution": 16, "aspect_ratio_buckets": "64,64;64,128"},
    "sdxl": {"resolution": 16, "aspect_ratio_buckets": "64,64;64,128"},
    "sd3": {"resolution": 8, "aspect_ratio_buckets": "16,16;16,32", "max_sequence_length": 8},
    "sd35": {"resolution": 8, "aspect_ratio_buckets": "16,16;16,32", "max_sequence_length": 8},
    "flux": {"resolution": 8, "aspect_ratio_buckets": "16,16;16,32", "max_sequence_length": 8},
    "wan": {"resolution": 16, "aspect_ratio_buckets": "16,16;16,32", "max_sequence_length": 8, "num_frames": 9},
}


def smoke_config(config: dict, workdir: Path) -> dict:
    from vipo_trl.testing import pickapic_dataset, tiny_pipeline, video_dataset

    family = next(f for key, f in FAMILY_OF_MODEL.items() if key in config["model_name_or_path"])
    tiny_pipeline(family).save_pretrained(workdir / "model")
    data = video_dataset(4) if family == "wan" else pickapic_dataset(6, ties=1)
    data.save_to_disk(str(workdir / "data"))
    config = {**config, "model_name_or_path": str(workdir / "model"), "dataset_name": str(workdir / "data")}
    overrides = {
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "bf16": False,
        "use_cpu": True,
        "save_strategy": "no",
        "output_dir": str(workdir / "out"),
        "report_to": "none",
        "lora_r": 4,
        "lora_alpha": 4,
        "warmup_steps": 0,
    }
    overrides.update({k: v for k, v in SMOKE[family].items() if k in config or k == "resolution"})
    config.update(overrides)
    if family == "wan":
        config["video_fps"] = None
    config.pop("dataset_train_split", None)
    return config


def run(config_path: str, smoke: bool, extra: list[str]) -> Path:
    config = yaml.safe_load(Path(config_path).read_text())
    workdir = Path(tempfile.mkdtemp(prefix="vipo-example-"))
    if smoke:
        config = smoke_config(config, workdir)
    resolved = workdir / "config.yaml"
    resolved.write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}))
    vipo_trl(["train", "--config", str(resolved), *extra])
    return Path(config["output_dir"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--smoke", action="store_true", help="two CPU steps on tiny components of the same family")
    args, extra = parser.parse_known_args()
    out = run(args.config, args.smoke, extra)
    print(f"done: {out}")
