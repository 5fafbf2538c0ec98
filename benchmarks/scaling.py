"""Estimates of memory per GPU and pair throughput for real models, printed as the tables of benchmarks/SCALING.md.

    python benchmarks/scaling.py [--mfu 0.4] [--peak_tflops 989]

Everything here is arithmetic on published parameter counts and token counts, under the assumptions stated in
SCALING.md; none of it was measured on a GPU.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9


@dataclass
class Model:
    name: str
    params: float  # denoiser parameters
    tokens: int  # sequence length the denoiser sees per sample (image/video tokens + text tokens it attends to)
    width: int
    layers: int
    setting: str
    forward_tflops: float | None = None  # when not a plain transformer (UNet): a stated estimate instead

    def forward_flops(self) -> float:
        if self.forward_tflops is not None:
            return self.forward_tflops * 1e12
        linear = 2 * self.params * self.tokens
        attention = 4 * self.tokens**2 * self.width * self.layers  # QK^T and AV
        return linear + attention


MODELS = [
    Model("SDXL (UNet)", 2.57e9, 4096, 1280, 70, "1024px", forward_tflops=6.0),
    Model("SD3.5-Medium (MMDiT-X)", 2.47e9, 4096 + 333, 1536, 24, "1024px, 77+256 text tokens"),
    Model("FLUX.1-dev (MMDiT)", 11.9e9, 4096 + 512, 3072, 57, "1024px, 512 T5 tokens"),
    Model("Wan2.1-T2V-1.3B (DiT)", 1.42e9, 21 * 30 * 52, 1536, 30, "480x832, 81 frames"),
]


def memory_per_gpu(p: float, mode: str, gpus: int) -> float:
    """Bytes per GPU for weights, gradients, optimizer state and the reference (activations and cached inputs aside).

    Full fine-tuning is bf16 mixed precision as transformers' Trainer runs it: fp32 weights (4 B/param), fp32
    gradients (4), AdamW moments (8), and the frozen reference copy in bf16 (2), which the trainer keeps whole on every
    GPU. ZeRO-2 shards gradients and optimizer state; ZeRO-3/FSDP also the weights. LoRA: frozen bf16 weights (2), the
    reference is the same weights with adapters off; LoRA weights and their optimizer state are negligible.
    """
    if mode == "lora":
        return 2 * p
    if mode == "full":
        return (4 + 4 + 8) * p + 2 * p
    if mode == "full-8bit":
        return (4 + 4 + 2) * p + 2 * p
    if mode == "zero2":
        return 4 * p + (4 + 8) * p / gpus + 2 * p
    if mode == "zero3":
        return (4 + 4 + 8) * p / gpus + 2 * p
    raise ValueError(mode)


def pair_flops(model: Model, lora: bool, checkpointing: bool = True) -> float:
    """Policy forward + backward on both images, reference forward on both. A full backward costs 2 forwards (input
    and weight gradients); LoRA's backward needs the input gradients only (1 forward). Checkpointing adds a forward."""
    f = model.forward_flops()
    backward = (1 if lora else 2) * f
    policy = f + backward + (f if checkpointing else 0)
    return 2 * policy + 2 * f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of one GPU (H100 SXM)")
    args = parser.parse_args()
    rate = args.mfu * args.peak_tflops * 1e12

    print("### Memory per GPU (GB): weights, gradients, optimizer state, reference; activations and encoders aside\n")
    columns = ["LoRA", "full, 1 GPU", "full + 8-bit AdamW, 1 GPU", "ZeRO-2, 8", "ZeRO-3/FSDP, 8", "ZeRO-3/FSDP, 64"]
    print("| model | params | " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for m in MODELS:
        cells = [
            memory_per_gpu(m.params, "lora", 1),
            memory_per_gpu(m.params, "full", 1),
            memory_per_gpu(m.params, "full-8bit", 1),
            memory_per_gpu(m.params, "zero2", 8),
            memory_per_gpu(m.params, "zero3", 8),
            memory_per_gpu(m.params, "zero3", 64),
        ]
        print(f"| {m.name} | {m.params / 1e9:.2f}B | " + " | ".join(f"{c / GB:.0f}" for c in cells) + " |")

    assumed = f"{args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOPS"
    print(f"\n### Pair throughput (pairs/s), gradient checkpointing on, {assumed}\n")
    print("| model | setting | forward TFLOPs/sample | LoRA, 1 GPU | LoRA, 8 | LoRA, 64 | full, 8 | full, 64 |")
    print("|---|---|---|---|---|---|---|---|")
    for m in MODELS:
        lora, full = rate / pair_flops(m, True), rate / pair_flops(m, False)
        print(
            f"| {m.name} | {m.setting} | {m.forward_flops() / 1e12:.1f} | {lora:.2f} | {8 * lora:.1f} | "
            f"{64 * lora:.0f} | {8 * full:.1f} | {64 * full:.0f} |"
        )


if __name__ == "__main__":
    main()
