"""The per-step data path on its own: PolyDPOTrainer's (rows -> `PreferencePairs` -> `PreferenceCollator`, what its
DataLoader runs in the training process when `dataloader_num_workers=0`) against the diffusers-style loop's
(`bench_step.loop_pixels`: decode, resize, scale), on the same encoded images, in one process, the two alternating
within each round. Printed: ms per batch for each, and the trainer/loop ratio per round (min/median/max).

At `dataloader_num_workers=0` this work sits on every training step in both loops, and on a GPU it is CPU time the
GPU waits for: at SD1.5 size on an H100 (4 pairs of 1024-px PNGs a step) the trainer's DataLoader took about 0.33 s a
batch under the profiler, where the profiled step took 0.94 s (benchmarks/RESULTS.md, 2026-11-27).

    python benchmarks/bench_data.py                         # 1024-px PNGs to 512 px, 4 pairs a batch
    python benchmarks/bench_data.py --format jpeg           # Pick-a-Pic's images are JPEG-compressed
    python benchmarks/bench_data.py --smoke                 # seconds: checks it runs
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import loop_pixels  # noqa: E402
from common import spread  # noqa: E402


def textured_image(seed: int, size: int, image_format: str) -> bytes:
    """A smooth random picture with fine noise on top: it compresses and decodes like a generated image, where a
    flat colour would decode in no time."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    pixels = np.asarray(coarse).astype(np.int16) + rng.integers(-6, 7, (size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format=image_format.upper())
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=1024, help="side of the stored images")
    parser.add_argument("--resolution", type=int, default=512, help="training resolution")
    parser.add_argument("--batch", type=int, default=4, help="pairs per batch")
    parser.add_argument("--batches", type=int, default=4, help="timed batches per mode per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--format", choices=["png", "jpeg"], default="png")
    parser.add_argument("--smoke", action="store_true", help="small images, 1 round: checks it runs")
    parser.add_argument("--json", help="also write every measurement to this file")
    opts = parser.parse_args()
    if opts.smoke:
        opts.image_size, opts.resolution, opts.batch, opts.batches, opts.rounds = 128, 64, 2, 1, 1

    import torch
    from datasets import Dataset

    from vipo_trl import PolyDPOConfig
    from vipo_trl.data import PreferenceCollator, pairs_from_options

    torch.set_num_threads(1)  # the data path is single-threaded PIL work in both; keep torch's share equal too
    rows = opts.batch * opts.batches
    images = [textured_image(seed, opts.image_size, opts.format) for seed in range(2 * rows)]
    dataset = Dataset.from_dict(
        {
            "caption": [f"prompt {i}" for i in range(rows)],
            "jpg_0": images[:rows],
            "jpg_1": images[rows:],
            "label_0": [1.0, 0.0] * (rows // 2) + [1.0] * (rows % 2),
            "label_1": [0.0, 1.0] * (rows // 2) + [0.0] * (rows % 2),
        }
    )
    # The trainer's own settings: PolyDPOConfig's data options and collator, as PolyDPOTrainer builds them.
    config = PolyDPOConfig(output_dir="unused", resolution=opts.resolution, random_flip=False, report_to=[])
    pairs = pairs_from_options(dataset, config.data_options(), 8)
    collator = PreferenceCollator(config.resolution, config.center_crop, config.random_flip)

    def trainer_batches() -> None:
        for b in range(opts.batches):
            batch = collator([pairs[i] for i in range(b * opts.batch, (b + 1) * opts.batch)])
            assert batch["pixel_values_chosen"].shape[-1] == opts.resolution

    def loop_batches() -> None:
        for b in range(opts.batches):
            part = dataset[b * opts.batch : (b + 1) * opts.batch]
            chosen = [j0 if l0 == 1 else j1 for j0, j1, l0 in zip(part["jpg_0"], part["jpg_1"], part["label_0"])]
            rejected = [j1 if l0 == 1 else j0 for j0, j1, l0 in zip(part["jpg_0"], part["jpg_1"], part["label_0"])]
            torch.stack([loop_pixels(x, opts.resolution) for x in chosen + rejected])

    trainer_batches(), loop_batches()  # warm-up: first decodes, allocator
    rounds = []
    for index in range(opts.rounds):
        figures = {}
        order = [("trainer", trainer_batches), ("loop", loop_batches)]
        for name, run in order if index % 2 == 0 else order[::-1]:  # each goes first in every other round
            start = time.perf_counter()
            run()
            figures[name] = (time.perf_counter() - start) / opts.batches * 1000
        rounds.append(figures)
        print(
            f"round {index + 1}/{opts.rounds}: trainer {figures['trainer']:.1f} ms/batch, loop {figures['loop']:.1f} "
            f"ms/batch, ratio {figures['trainer'] / figures['loop']:.2f}",
            flush=True,
        )
    ratios = [r["trainer"] / r["loop"] for r in rounds]
    print(
        f"\n{opts.batch} pairs a batch, {opts.image_size}-px {opts.format.upper()} -> {opts.resolution} px: trainer "
        f"{statistics.median(r['trainer'] for r in rounds):.1f} ms/batch, loop "
        f"{statistics.median(r['loop'] for r in rounds):.1f} ms/batch (medians); trainer/loop {spread(ratios)}"
    )
    if opts.json:
        Path(opts.json).write_text(json.dumps({"settings": vars(opts), "rounds": rounds, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
