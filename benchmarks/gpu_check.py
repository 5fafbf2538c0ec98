"""The GPU check: bf16 LoRA Poly-DPO steps on denoisers of real size (SD1.5's and SDXL's UNet, FLUX.1's transformer,
random weights built from their published configs, nothing downloaded), plain and with gradient checkpointing,
`torch.compile` and 8-bit AdamW. Prints and appends to `benchmarks/RESULTS.md`: step time, pairs/s and
`torch.cuda.max_memory_allocated`, with the device named.

    bash benchmarks/gpu_check.sh              # on a CUDA machine (about 6 minutes on one H100)
    bash benchmarks/gpu_check.sh --dry-run    # tiny versions of the same models, CPU, one step each (CI)

A step is what `PolyDPOTrainer` does per batch with LoRA and a latent cache: the policy forward on the pair batch
(chosen and rejected share noise and timestep), the reference forward with the adapters disabled under
`inference_mode`, the Poly-DPO loss from `vipo_trl.losses`, backward, clip, optimizer step.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "RESULTS.md"
MODES = ("plain", "checkpointing", "compile", "adamw8bit")


def build(size: str, tiny: bool) -> tuple[torch.nn.Module, dict, tuple[int, int, int]]:
    """The denoiser, its constant conditioning per sample, and the latent shape (C, H, W)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    if size == "sd15":
        cfg = dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            sample_size=64,
        )
        if tiny:
            cfg.update(block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=4)
        net = UNet2DConditionModel(**cfg)
        return (
            net,
            {"encoder_hidden_states": (77, cfg["cross_attention_dim"])},
            (4, 64 if not tiny else 16, 64 if not tiny else 16),
        )
    if size == "sdxl":
        cfg = dict(
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            sample_size=128,
        )
        if tiny:
            cfg.update(
                block_out_channels=(32, 64, 64),
                transformer_layers_per_block=(1, 1, 2),
                attention_head_dim=(2, 4, 4),
                cross_attention_dim=32,
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=80,
            )
        net = UNet2DConditionModel(**cfg)
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        cond = {"encoder_hidden_states": (77, cfg["cross_attention_dim"]), "text_embeds": (pooled,), "time_ids": (6,)}
        side = 128 if not tiny else 16
        return net, cond, (4, side, side)
    if size == "flux":
        cfg = dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
        if tiny:
            cfg.update(
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,
                pooled_projection_dim=32,
                axes_dims_rope=(4, 4, 8),
            )
        net = FluxTransformer2DModel(**cfg)
        tokens = 512 if not tiny else 8
        side = 128 if not tiny else 8  # latent side (1024 px / 8); packed into (side/2)^2 tokens of 64 channels
        cond = {
            "encoder_hidden_states": (tokens, cfg["joint_attention_dim"]),
            "pooled_projections": (cfg["pooled_projection_dim"],),
        }
        return net, cond, (16, side, side)
    raise ValueError(size)


def forward(net: torch.nn.Module, size: str, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    if size == "flux":
        b, c, h, w = x.shape
        packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
        ids[..., 1] = torch.arange(h // 2, device=x.device)[:, None]
        ids[..., 2] = torch.arange(w // 2, device=x.device)[None, :]
        out = net(
            hidden_states=packed,
            timestep=t.to(x.dtype) / 1000,
            guidance=torch.full((b,), 3.5, device=x.device, dtype=x.dtype),
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=cond["encoder_hidden_states"],
            txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=ids.reshape(-1, 3),
            return_dict=False,
        )[0]
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
    return net(x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added or None).sample


def run_mode(size: str, mode: str, pairs: int, steps: int, device: str, dtype: torch.dtype, tiny: bool) -> dict:
    from types import SimpleNamespace

    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    from vipo_trl.losses import DenoisingErrors, get_loss
    from vipo_trl.trainer.poly_dpo_trainer import switch_lora_layers

    torch.manual_seed(0)
    # Built on the device in its dtype: a 12B transformer initialised in float32 on the CPU takes minutes and 48 GB.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            net, cond_shapes, latent = build(size, tiny)
    finally:
        torch.set_default_dtype(default_dtype)
    net.requires_grad_(False).to(device, dtype)
    net.add_adapter(
        LoraConfig(
            r=64 if not tiny else 4,
            lora_alpha=64 if not tiny else 4,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    params = [p for p in net.parameters() if p.requires_grad]
    lora_layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
    for p in params:
        p.data = p.data.float()
    if mode == "checkpointing":
        net.enable_gradient_checkpointing()
    model = torch.compile(net) if mode == "compile" else net
    if mode == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-5)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-5)
    loss_fn, config = get_loss("poly_dpo"), SimpleNamespace(beta=5000.0, poly_alpha=1.0)
    cond = {k: torch.randn(2 * pairs, *shape, device=device, dtype=dtype) for k, shape in cond_shapes.items()}
    if "time_ids" in cond:
        cond["time_ids"] = torch.tensor([1024, 1024, 0, 0, 1024, 1024], device=device, dtype=dtype).repeat(2 * pairs, 1)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 2):  # two warm-up steps (compile, allocator)
        start = time.perf_counter()
        latents = torch.randn(pairs, *latent, device=device, dtype=dtype)
        noise = torch.randn_like(latents)
        x = torch.cat([latents, latents]) + torch.cat([noise, noise])  # the pair shares noise and timestep
        t = torch.randint(0, 1000, (pairs,), device=device).repeat(2)
        with torch.inference_mode():  # the reference: adapters off, as the trainer switches them
            switch_lora_layers(lora_layers, reference=True)
            ref = forward(net, size, x, t, cond).float()
            switch_lora_layers(lora_layers, reference=False)
        ref_err = (ref - torch.cat([noise, noise]).float()).pow(2).mean(dim=(1, 2, 3)).clone()
        pred = forward(model, size, x, t, cond).float()
        err = (pred - torch.cat([noise, noise]).float()).pow(2).mean(dim=(1, 2, 3))
        loss = loss_fn(DenoisingErrors(*err.chunk(2), *ref_err.chunk(2)), config).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
    step = statistics.median(times[2:]) if len(times) > 2 else times[-1]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {
        "size": size,
        "mode": mode,
        "pairs": pairs,
        "s_per_step": step,
        "pairs_per_s": pairs / step,
        "peak_gib": peak,
        "warmup_s": [round(t, 3) for t in times[:2]],  # the first holds torch.compile's compilation
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny models, CPU, float32, one step: checks the code")
    parser.add_argument("--sizes", nargs="+", default=["sd15", "sdxl", "flux"])
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument(
        "--no-cudnn-attention",
        action="store_true",
        help="turn off cuDNN's scaled-dot-product attention (flash or memory-efficient attention instead)",
    )
    parser.add_argument("--jsonl", default=None, help="also append each row to this file as soon as it is measured")
    args = parser.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run with --dry-run to check the script on the CPU.")
    device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    pairs = {"sd15": 4, "sdxl": 2, "flux": 1} if not dry else {"sd15": 1, "sdxl": 1, "flux": 1}
    rows = []
    # torch.compile last: its compile time is the least important figure if the machine is taken back mid-way
    order = [(size, mode) for mode in args.modes if mode != "compile" for size in args.sizes]
    order += [(size, "compile") for size in args.sizes if "compile" in args.modes]
    context_lost = False
    for size, mode in order:
        if context_lost:
            break
        if dry and mode == "compile":
            rows.append({"size": size, "mode": mode, "skipped": "not compiled in a CPU dry run"})
        else:
            try:
                rows.append(run_mode(size, mode, pairs[size], 1 if dry else args.steps, device, dtype, tiny=dry))
            except torch.cuda.OutOfMemoryError:
                rows.append({"size": size, "mode": mode, "skipped": "out of memory"})
            except (ImportError, RuntimeError) as exc:  # recorded, so one failing mode does not cost the others
                print(f"{size} {mode}: {type(exc).__name__}: {exc}", flush=True)
                rows.append({"size": size, "mode": mode, "skipped": f"{type(exc).__name__}: {str(exc)[:80]}"})
                # the CUDA context is unusable after a device-side error: nothing more can run in this process
                context_lost = isinstance(exc, getattr(torch, "AcceleratorError", ()))
            if not context_lost:
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
        print(rows[-1], flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    name = "CPU (dry run, tiny models)" if dry else torch.cuda.get_device_name(0)
    lines = [
        "",
        f"## GPU check: bf16 LoRA Poly-DPO steps at real size ({name}, {datetime.date.today()})",
        "",
        "`bash benchmarks/gpu_check.sh" + (" --dry-run" if dry else "") + "`; LoRA r=64 on the attention projections, "
        "random weights from the published configs; SD1.5 at 512 px (4 pairs), SDXL at 1024 px (2 pairs), FLUX.1 at "
        "1024 px (1 pair); median of the timed steps after two warm-up steps.",
        "",
        "| model | mode | s/step | pairs/s | max allocated (GiB) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['size']} | {r['mode']} | skipped: {r['skipped']} | | |")
        else:
            lines.append(
                f"| {r['size']} | {r['mode']} | {r['s_per_step']:.3f} | {r['pairs_per_s']:.2f} | {r['peak_gib']:.1f} |"
            )
    print("\n".join(lines))
    if not dry and not args.no_write:
        with open(RESULTS, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
