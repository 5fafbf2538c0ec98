"""Training from the latent cache versus from raw images: steps per second and peak memory, side by side.

Both modes train the same small Stable Diffusion config (a UNet, VAE and CLIP text encoder of realistic depth but
small width) with LoRA on the same pairs, alternating in fresh subprocesses so that each one's peak RSS is its own
(the cache mode loads neither VAE nor text encoder); peak memory is the growth of the resident set size from just
before the model is loaded. Prints the cache/raw ratios (min, median, max over repeats).

    python benchmarks/bench_cache.py [--repeats 3] [--steps 8] [--resolution 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MemoryProbe, pickapic_pairs, small_sd, spread  # noqa: E402


def worker(mode: str, model: str, data: str, cache: str, steps: int, resolution: int) -> None:
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig
    from transformers import TrainerCallback

    from vipo_trl import PolyDPOConfig, PolyDPOTrainer

    torch.set_num_threads(2)
    args = PolyDPOConfig(
        output_dir=tempfile.mkdtemp(),
        resolution=resolution,
        per_device_train_batch_size=4,
        max_steps=steps + 2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=10_000,
        random_flip=False,
    )
    lora = LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    dataset = cache if mode == "cache" else load_from_disk(data)
    probe = MemoryProbe("cpu")
    trainer = PolyDPOTrainer(model, args, dataset, peft_config=lora)
    stamps = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            probe.start_of_training()

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()
    seconds = stamps[-1] - stamps[1]  # the first two steps are warm-up
    peak_mb = probe.peak_mb()
    modules = [trainer.model, *trainer.family.frozen_modules.values()]
    weights_mb = sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / 2**20
    print(json.dumps({"steps_per_sec": (len(stamps) - 2) / seconds, "peak_rss_mb": peak_mb, "weights_mb": weights_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--worker", choices=["raw", "cache"])
    parser.add_argument("--model"), parser.add_argument("--data"), parser.add_argument("--cache")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.model, args.data, args.cache, args.steps, args.resolution)

    from vipo_trl import PolyDPOConfig, build_latent_cache

    work = Path(tempfile.mkdtemp())
    small_sd(str(work / "model"))
    # Images at 2x the training resolution, as real data is larger than what it is cropped to.
    big = args.resolution * 2
    data = pickapic_pairs(48, big)
    data.save_to_disk(str(work / "data"))
    config = PolyDPOConfig(output_dir=str(work), resolution=args.resolution, random_flip=False, report_to=[])
    start = time.perf_counter()
    build_latent_cache(str(work / "model"), data, work / "cache", config, show_progress=False)
    cache_seconds = time.perf_counter() - start

    results: dict[str, list[dict]] = {"raw": [], "cache": []}
    for _ in range(args.repeats):
        for mode in ("raw", "cache"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    mode,
                    "--model",
                    str(work / "model"),
                    "--data",
                    str(work / "data"),
                    "--cache",
                    str(work / "cache"),
                    "--steps",
                    str(args.steps),
                    "--resolution",
                    str(args.resolution),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def ratios(key: str) -> list[float]:
        return [c[key] / r[key] for r, c in zip(results["raw"], results["cache"])]

    speed, memory, weights = ratios("steps_per_sec"), ratios("peak_rss_mb"), ratios("weights_mb")
    setup = f"LoRA r=8, batch 4 pairs, {args.resolution}px crops of {big}px images"
    print(f"small SD config, {setup}, CPU, {args.repeats} runs per mode")
    print(f"building the cache of {len(data)} pairs: {cache_seconds:.1f} s")
    for mode in ("raw", "cache"):
        sps = [r["steps_per_sec"] for r in results[mode]]
        mb = [r["peak_rss_mb"] for r in results[mode]]
        loaded = results[mode][0]["weights_mb"]
        print(
            f"{mode:>5}: {statistics.median(sps):.2f} steps/s (median), peak RSS {statistics.median(mb):.0f} MB, "
            f"weights loaded {loaded:.1f} MB"
        )
    print(f"cache/raw steps per second: {spread(speed)}")
    print(f"cache/raw peak RSS:         {spread(memory)}")
    print(f"cache/raw weights loaded:   {spread(weights)}")


if __name__ == "__main__":
    main()
