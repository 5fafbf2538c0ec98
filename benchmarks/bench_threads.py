"""Seconds per step of the embedded default's training (`vipo-trl train`'s setting, raw synthetic pairs) at 1 and 2
intra-op threads, each in a fresh subprocess, alternating, several rounds. Run it alone and again beside a busy
process (e.g. `--busy`, which starts one) to see which thread count holds up.

    python benchmarks/bench_threads.py [--steps 30] [--rounds 2] [--busy]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def worker(threads: int, steps: int) -> None:
    import torch

    torch.set_num_threads(threads)
    import tempfile

    from peft import LoraConfig
    from transformers import TrainerCallback

    from vipo_trl import PolyDPOConfig, PolyDPOTrainer
    from vipo_trl.default import DEFAULT_LORA, DEFAULT_SETTINGS, MODEL_DIR
    from vipo_trl.testing import pickapic_dataset

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            stamps.append(time.perf_counter())

    settings = {**DEFAULT_SETTINGS, "output_dir": tempfile.mkdtemp(), "max_steps": steps + 2, "logging_steps": 1000}
    config = PolyDPOConfig(**settings, use_cpu=True, disable_tqdm=True)
    lora = LoraConfig(**DEFAULT_LORA)
    trainer = PolyDPOTrainer(str(MODEL_DIR), config, pickapic_dataset(64), peft_config=lora, callbacks=[Clock()])
    trainer.train()
    per_step = (stamps[-1] - stamps[1]) / (len(stamps) - 2)  # the first two steps warm up
    print(json.dumps({"threads": threads, "seconds_per_step": per_step}))


def busy_loop() -> subprocess.Popen:
    code = "import torch\nx = torch.randn(512, 512)\nwhile True:\n    x = (x @ x).tanh()\n"
    return subprocess.Popen([sys.executable, "-c", code])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--busy", action="store_true", help="run a busy torch process beside the measurements")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.steps)
    busy = busy_loop() if args.busy else None
    try:
        times: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.rounds):
            for threads in (1, 2):
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", str(threads), "--steps", str(args.steps)],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                times[threads].append(json.loads(out.strip().splitlines()[-1])["seconds_per_step"])
    finally:
        if busy is not None:
            busy.kill()
    for threads, values in times.items():
        print(
            f"{threads} thread(s): s/step min {min(values):.3f} median {statistics.median(values):.3f} "
            f"max {max(values):.3f}"
        )
    ratios = [two / one for one, two in zip(times[1], times[2])]
    print(f"2 threads / 1 thread per round: {', '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
