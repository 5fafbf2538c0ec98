"""Host time of switching a LoRA network to its reference and back, as every Poly-DPO step with LoRA does twice:
diffusers' model-level calls (`disable_adapters()`/`enable_adapters()`, or `set_adapter(...)` when the reference
is a second, frozen LoRA) walk every module each time; the trainer's `switch_lora_layers` visits only the LoRA
layers it found once. Denoisers of real size (`gpu_check.build`: SD1.5's and SDXL's UNet, FLUX.1's transformer) built
on the meta device, so nothing is allocated and only the Python work is timed; LoRA r=64 on the attention
projections. The two ways alternate within each round; the ratio is printed per round.

    python benchmarks/bench_adapter_switch.py [--sizes sd15 sdxl flux] [--rounds 5] [--switches 50]
    python benchmarks/bench_adapter_switch.py --smoke    # a tiny UNet, a few switches (CI)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_check import build  # noqa: E402


def lora_network(size: str, tiny: bool, reference_adapter: bool) -> torch.nn.Module:
    from peft import LoraConfig

    with torch.device("meta"):
        net, _, _ = build(size, tiny)
        rank = 4 if tiny else 64
        lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        net.add_adapter(lora)
        if reference_adapter:  # as the trainer holds an earlier round's LoRA (peft warns of a second adapter)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                net.add_adapter(lora, adapter_name="reference")
            net.set_adapter("default")
    return net


def time_switches(switch, n: int) -> float:
    """Milliseconds per step: `n` times to the reference and back."""
    start = time.perf_counter()
    for _ in range(n):
        switch(True)
        switch(False)
    return (time.perf_counter() - start) / n * 1000


def measure(size: str, tiny: bool, reference_adapter: bool, rounds: int, switches: int) -> dict:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from vipo_trl.trainer.poly_dpo_trainer import switch_lora_layers

    net = lora_network(size, tiny, reference_adapter)
    layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
    adapter = "reference" if reference_adapter else None

    def diffusers_switch(reference: bool) -> None:
        if adapter is not None:
            net.set_adapter(adapter if reference else "default")
        elif reference:
            net.disable_adapters()
        else:
            net.enable_adapters()

    def trainer_switch(reference: bool) -> None:
        switch_lora_layers(layers, reference, adapter)

    # Both make every LoRA layer compute as the reference, and leave the policy's LoRA on and trainable after.
    reference_state = (False, ["reference"]) if adapter else (True, ["default"])
    for switch in (diffusers_switch, trainer_switch):
        switch(True)
        assert all((m.disable_adapters, m.active_adapters) == reference_state for m in layers)
        switch(False)
        assert all((m.disable_adapters, m.active_adapters) == (False, ["default"]) for m in layers)
        assert all(p.requires_grad == (".default." in n) for n, p in net.named_parameters() if "lora_" in n)
    time_switches(diffusers_switch, 2), time_switches(trainer_switch, 2)  # warm-up
    rows = []
    for _ in range(rounds):
        diffusers_ms = time_switches(diffusers_switch, switches)
        rows.append({"diffusers_ms": diffusers_ms, "trainer_ms": time_switches(trainer_switch, switches)})
    ratios = [r["trainer_ms"] / r["diffusers_ms"] for r in rows]
    return {
        "size": size + ("-tiny" if tiny else ""),
        "reference": "a second LoRA" if reference_adapter else "adapters disabled",
        "modules": sum(1 for _ in net.modules()),
        "lora_layers": len(layers),
        "diffusers_ms_per_step": statistics.median(r["diffusers_ms"] for r in rows),
        "trainer_ms_per_step": statistics.median(r["trainer_ms"] for r in rows),
        "trainer_over_diffusers": [round(min(ratios), 3), round(statistics.median(ratios), 3), round(max(ratios), 3)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["sd15", "sdxl", "flux"], choices=["sd15", "sdxl", "flux"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--switches", type=int, default=50, help="steps (to the reference and back) per round")
    parser.add_argument("--smoke", action="store_true", help="a tiny SD1.5-shaped UNet, 2 rounds of 3 steps")
    args = parser.parse_args()
    sizes, rounds, switches = (["sd15"], 2, 3) if args.smoke else (args.sizes, args.rounds, args.switches)
    print(
        "size | reference | modules | LoRA layers | diffusers ms/step | trainer ms/step | trainer/diffusers min/med/max"
    )
    for size in sizes:
        for reference_adapter in (False, True):
            row = measure(size, args.smoke, reference_adapter, rounds, switches)
            print(
                f"{row['size']} | {row['reference']} | {row['modules']} | {row['lora_layers']} | "
                f"{row['diffusers_ms_per_step']:.2f} | {row['trainer_ms_per_step']:.2f} | "
                + " / ".join(f"{r:.2f}" for r in row["trainer_over_diffusers"])
            )
            print(json.dumps(row))


if __name__ == "__main__":
    main()
