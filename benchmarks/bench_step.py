"""PolyDPOTrainer against the reference Diffusion-DPO training loop: time per step and peak memory, side by side.

The reference is a minimal loop written the way the original Diffusion-DPO example trains: a full copy of the UNet
for the policy and a second full copy for the reference, the VAE and the text encoder run on every step, AdamW, the
gradient clipped to 1. Every mode trains the same model on the same pairs at the same batch, each in a fresh
subprocess (so each peak memory is its own), the modes alternating, `--repeats` rounds. Printed: each mode's median
time per step and peak memory, and the ratios the performance targets are stated in (min/median/max over rounds;
each ratio is taken within one round, so machine noise between rounds cancels).

    python benchmarks/bench_step.py                 # CPU, small SD config, 3 rounds
    python benchmarks/bench_step.py --smoke         # seconds: tiny config, 1 round (CI)
    python benchmarks/bench_step.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --resolution 512 \\
        --batch 4 --bf16 --steps 20                 # a real checkpoint on a GPU

Peak memory is CUDA max allocated on a GPU; on a CPU the growth of the resident set size over its value just before
the model is loaded (Python and the libraries are left out; allocator caches are not). Either way the peak is taken
over training only, so it counts the weights held and what training adds, not loading transients.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MemoryProbe, pickapic_pairs, sd15_sized, sdxl_sized, small_sd, spread  # noqa: E402

MODES = {
    "reference": "reference loop: two full UNet copies, VAE + text encoder every step",
    "full": "PolyDPOTrainer, full fine-tune",
    "full_8bit": "PolyDPOTrainer, full fine-tune, 8-bit AdamW",
    "lora": "PolyDPOTrainer, LoRA (reference = adapters disabled)",
    "lora_cache": "PolyDPOTrainer, LoRA + latent cache",
    "lora_cache_gc": "PolyDPOTrainer, LoRA + latent cache + gradient checkpointing",
    "lora_cache_mapo": "PolyDPOTrainer, LoRA + latent cache, reference-free loss (MaPO)",
    "lora_cache_sft": "PolyDPOTrainer, LoRA + latent cache, sft (chosen image only, no reference)",
    "diffusers_lora": "diffusers-style LoRA loop: adapters disabled for the reference, VAE + text encoder every step",
}
#: Optional modes (`--extra`): not part of the targets.
EXTRA_MODES = {
    "lora_cache_compile": "PolyDPOTrainer, LoRA + latent cache + torch.compile (TrainingArguments.torch_compile)",
    "full_compile": "PolyDPOTrainer, full fine-tune + torch.compile (the policy, and the reference copy)",
    "lora_workers": "PolyDPOTrainer, LoRA, images decoded by 2 DataLoader workers (dataloader_num_workers=2)",
}
BETA = 2000.0  # Diffusion-DPO's beta for SD 1.5
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

SECONDS = "seconds_per_step"
# (name, numerator mode, denominator mode, quantity, target, "<=", "<" or ">=")
TARGETS = [
    ("trainer overhead: full fine-tune time/step vs reference", "full", "reference", "seconds_per_step", 1.05, "<="),
    ("LoRA peak memory vs reference (two copies)", "lora", "reference", "peak_mb", 0.6, "<="),
    ("latent cache steps/s vs re-encoding (LoRA)", "lora", "lora_cache", "seconds_per_step", 1.3, ">="),
    (
        "reference-free loss steps/s vs Poly-DPO (LoRA + cache)",
        "lora_cache",
        "lora_cache_mapo",
        "seconds_per_step",
        1.2,
        ">=",
    ),
    (
        "sft (chosen only) steps/s vs Poly-DPO (LoRA + cache)",
        "lora_cache",
        "lora_cache_sft",
        "seconds_per_step",
        1.5,
        ">=",
    ),
    ("LoRA time/step vs the diffusers-style LoRA loop", "lora", "diffusers_lora", "seconds_per_step", 1.05, "<="),
    ("LoRA peak memory vs the diffusers-style LoRA loop", "lora", "diffusers_lora", "peak_mb", 1.05, "<="),
    (
        "LoRA + cache time/step vs the diffusers-style LoRA loop",
        "lora_cache",
        "diffusers_lora",
        "seconds_per_step",
        1.0,
        "<",
    ),
]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def loop_pixels(data_bytes: bytes, size: int):
    """How the reference loops turn an encoded image into a `[3, size, size]` tensor in [-1, 1] (as diffusers'
    script does: decode, resize, scale)."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    image = Image.open(io.BytesIO(data_bytes)).convert("RGB")
    image = image.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)


def reference_loop(
    opts: argparse.Namespace, lora: bool = False, on_step: Callable[[], None] | None = None
) -> tuple[list[float], float]:
    """Diffusion-DPO the way its reference script trains (two full UNet copies), or with `lora` the way diffusers'
    `train_diffusion_dpo.py` trains (one UNet with LoRA adapters, the reference = the same UNet with the adapters
    disabled under `no_grad`); VAE and text encoder(s) on every step either way. An SDXL pipeline is conditioned as
    diffusers' `train_diffusion_dpo_sdxl.py` does it (both encoders' penultimate states, the pooled projection, the
    size and crop time ids). Returns step end times and peak memory (MB); `on_step` is called at the end of every
    step."""
    import torch
    import torch.nn.functional as F
    from datasets import load_from_disk
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    data = load_from_disk(opts.data)
    device, dtype = opts.device, torch.bfloat16 if opts.bf16 else torch.float32
    probe = MemoryProbe(device)
    tokenizer = CLIPTokenizer.from_pretrained(opts.model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(opts.model, subfolder="text_encoder").to(device, dtype)
    xl = Path(opts.model, "text_encoder_2").is_dir()
    if xl:
        tokenizer_2 = CLIPTokenizer.from_pretrained(opts.model, subfolder="tokenizer_2")
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(opts.model, subfolder="text_encoder_2")
        text_encoder_2.to(device, dtype).requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(opts.model, subfolder="vae").to(device, dtype)
    if lora:
        from peft import LoraConfig

        unet = UNet2DConditionModel.from_pretrained(opts.model, subfolder="unet").to(device, dtype)
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_r, target_modules=LORA_TARGETS))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:  # trainable LoRA weights in float32, as the diffusers script casts them
            p.data = p.data.float()
        ref_unet = None
    else:
        unet = UNet2DConditionModel.from_pretrained(opts.model, subfolder="unet").to(device).train()
        ref_unet = UNet2DConditionModel.from_pretrained(opts.model, subfolder="unet").to(device, dtype).eval()
        params = list(unet.parameters())
    for frozen in (text_encoder, vae, ref_unet):
        if frozen is not None:
            frozen.requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(opts.model, subfolder="scheduler")
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    size = opts.resolution

    def ids_of(tok, prompts: list[str]) -> torch.Tensor:
        kwargs = dict(max_length=tok.model_max_length, padding="max_length", truncation=True, return_tensors="pt")
        return tok(prompts, **kwargs).input_ids.to(device)

    def conditioning(prompts: list[str]) -> tuple[torch.Tensor, dict | None]:
        """The text states for a pair batch (each prompt twice: chosen, rejected) and SDXL's added conditions."""
        if not xl:
            return text_encoder(ids_of(tokenizer, prompts))[0].repeat(2, 1, 1), None
        first = text_encoder(ids_of(tokenizer, prompts), output_hidden_states=True)
        second = text_encoder_2(ids_of(tokenizer_2, prompts), output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        time_ids = torch.tensor([[2 * size, 2 * size, 0, 0, size, size]], device=device, dtype=hidden.dtype)
        added = {"text_embeds": second.text_embeds, "time_ids": time_ids.repeat(len(prompts), 1)}
        return hidden.repeat(2, 1, 1), {k: v.repeat(2, 1) for k, v in added.items()}

    stamps = []
    b = opts.batch
    probe.start_of_training()
    for step in range(opts.steps + 2):
        start = (step * b) % (len(data) - b + 1)
        rows = data[start : start + b]
        chosen = [r0 if l0 == 1 else r1 for r0, r1, l0 in zip(rows["jpg_0"], rows["jpg_1"], rows["label_0"])]
        rejected = [r1 if l0 == 1 else r0 for r0, r1, l0 in zip(rows["jpg_0"], rows["jpg_1"], rows["label_0"])]
        pixels = torch.stack([loop_pixels(x, size) for x in chosen + rejected]).to(device, dtype)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            hidden, added = conditioning(rows["caption"])
        noise = torch.randn_like(latents[:b]).repeat(2, 1, 1, 1)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), device=device).repeat(2)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=opts.bf16):
            prediction = unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
        errors = (prediction.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
        with torch.no_grad():
            if lora:
                unet.disable_adapters()
            reference = unet if lora else ref_unet
            with torch.autocast(device, dtype=torch.bfloat16, enabled=opts.bf16):
                ref_prediction = reference(noisy, timesteps, hidden, added_cond_kwargs=added).sample
            if lora:
                unet.enable_adapters()
            ref_errors = (ref_prediction.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
        model_diff = errors[:b] - errors[b:]
        ref_diff = ref_errors[:b] - ref_errors[b:]
        loss = -F.logsigmoid(-0.5 * BETA * (model_diff - ref_diff)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        stamps.append(time.perf_counter())
        if on_step is not None:
            on_step()
    return stamps, probe.peak_mb()


def trainer_run(
    mode: str, opts: argparse.Namespace, on_step: Callable[[], None] | None = None
) -> tuple[list[float], float]:
    from datasets import load_from_disk
    from peft import LoraConfig
    from transformers import TrainerCallback

    from vipo_trl import PolyDPOConfig, PolyDPOTrainer

    use_cache = "_cache" in mode
    dataset = opts.cache if use_cache else load_from_disk(opts.data)
    args = PolyDPOConfig(
        output_dir=tempfile.mkdtemp(),
        resolution=opts.resolution,
        per_device_train_batch_size=opts.batch,
        max_steps=opts.steps + 2,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        optim="adamw_bnb_8bit" if mode.endswith("8bit") else "adamw_torch",
        beta=BETA,
        loss_type=["mapo"] if mode.endswith("mapo") else ["sft"] if mode.endswith("sft") else ["poly_dpo"],
        gradient_checkpointing=mode.endswith("_gc"),
        torch_compile=mode.endswith("compile"),
        dataloader_num_workers=2 if mode.endswith("workers") else 0,
        bf16=opts.bf16,
        use_cpu=opts.device == "cpu",
        random_flip=False,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        logging_steps=10_000,
    )
    probe = MemoryProbe(opts.device)
    lora = LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_r, target_modules=LORA_TARGETS)
    trainer = PolyDPOTrainer(opts.model, args, dataset, peft_config=lora if mode.startswith("lora") else None)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            probe.start_of_training()

        def on_step_end(self, *a, **k):
            _sync(opts.device)
            stamps.append(time.perf_counter())
            if on_step is not None:
                on_step()

    trainer.add_callback(Clock())
    trainer.train()
    return stamps, probe.peak_mb()


def worker(mode: str, opts: argparse.Namespace) -> None:
    import torch

    if opts.device == "cpu":
        torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    if mode in ("reference", "diffusers_lora"):
        stamps, peak_mb = reference_loop(opts, lora=mode == "diffusers_lora")
    else:
        stamps, peak_mb = trainer_run(mode, opts)
    # The first two steps are warm-up (allocator, lazy initialisation, compilation).
    seconds_per_step = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
    print(json.dumps({"mode": mode, "seconds_per_step": seconds_per_step, "peak_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Stable Diffusion 1.x/2.x pipeline (default: a small config built here)")
    parser.add_argument("--smoke", action="store_true", help="a tiny config, 1 round, 3 steps: checks it all runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run (after 2 warm-up steps)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--unet_width", type=int, default=64, help="small config: the UNet's base width")
    parser.add_argument(
        "--size",
        choices=["small", "sd15", "sdxl"],
        default="small",
        help="the model built here: a small SD config, or SD1.5's or SDXL's real sizes (random weights; ~4 GB or "
        "~14 GB written to /tmp)",
    )
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (frozen networks in bf16)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="runs at once (keep 1 for figures; --smoke runs 2 of 1 thread each: a check that it runs, not timing)",
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=[*MODES, *EXTRA_MODES])
    parser.add_argument("--extra", action="store_true", help="also run " + ", ".join(EXTRA_MODES))
    parser.add_argument("--json", help="also write every measurement and ratio to this file")
    parser.add_argument("--worker", choices=[*MODES, *EXTRA_MODES], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.device is None:
        import torch

        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.worker:
        return worker(opts.worker, opts)
    if opts.smoke:
        opts.repeats, opts.steps, opts.batch, opts.resolution, opts.unet_width = 1, 3, 2, 64, 16
        opts.parallel, opts.threads = 2, 1  # most of a smoke run is each worker importing torch and diffusers
    if opts.extra:
        opts.modes += [m for m in EXTRA_MODES if m not in opts.modes]

    from datasets import load_from_disk

    from vipo_trl import PolyDPOConfig, build_latent_cache

    work = Path(tempfile.mkdtemp())
    if opts.model is None:
        opts.model = str(work / "model")
        if opts.size == "sd15":
            sd15_sized(opts.model)
        elif opts.size == "sdxl":
            sdxl_sized(opts.model)
        else:
            small_sd(opts.model, unet_width=opts.unet_width, unet_levels=3)
    pairs = max(4 * opts.batch, 16)
    pickapic_pairs(pairs, opts.resolution * 2).save_to_disk(str(work / "data"))
    opts.data, opts.cache = str(work / "data"), str(work / "cache")
    if any("_cache" in m for m in opts.modes):
        config = PolyDPOConfig(output_dir=str(work), resolution=opts.resolution, random_flip=False, report_to=[])
        build_latent_cache(opts.model, load_from_disk(opts.data), opts.cache, config, show_progress=False)

    forwarded = ["--model", opts.model, "--data", opts.data, "--cache", opts.cache, "--device", opts.device]
    for key in ("steps", "batch", "resolution", "lora_r", "threads"):
        forwarded += [f"--{key}", str(getattr(opts, key))]
    forwarded += ["--bf16"] if opts.bf16 else []
    rounds: list[dict[str, dict]] = []

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, __file__, "--worker", mode, *forwarded], capture_output=True, text=True)

    for round_index in range(opts.repeats):
        results = {}
        with ThreadPoolExecutor(max_workers=opts.parallel) as pool:
            for mode, out in zip(opts.modes, pool.map(run, opts.modes)):  # in mode order, each as it finishes
                if out.returncode != 0:
                    sys.exit(f"mode {mode} failed:\n{out.stderr[-4000:]}")
                results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
                print(
                    f"round {round_index + 1}/{opts.repeats} {mode:>18}: "
                    f"{results[mode]['seconds_per_step']:.3f} s/step, peak {results[mode]['peak_mb']:.0f} MB",
                    flush=True,
                )
        rounds.append(results)
    report(opts, rounds)


def report(opts: argparse.Namespace, rounds: list[dict[str, dict]]) -> None:
    def median(mode: str, key: str) -> float:
        return statistics.median(r[mode][key] for r in rounds)

    name = opts.model if "/" in opts.model and not opts.model.startswith("/") else opts.size + " SD config"
    width = 320 if opts.size in ("sd15", "sdxl") else opts.unet_width
    print(
        f"\nmodel {name} (UNet width {width}), batch {opts.batch} pairs, {opts.resolution}px, "
        f"{'bf16' if opts.bf16 else 'fp32'}, device {opts.device}, {opts.repeats} rounds of {opts.steps} timed steps"
    )
    print("| mode | s/step (median) | steps/s vs reference | peak MB (median) | peak vs reference |")
    print("|---|---|---|---|---|")
    ref = "reference" in opts.modes
    for mode in opts.modes:
        speed = [r["reference"]["seconds_per_step"] / r[mode]["seconds_per_step"] for r in rounds] if ref else None
        memory = [r[mode]["peak_mb"] / r["reference"]["peak_mb"] for r in rounds] if ref else None
        print(
            f"| {mode}: {(MODES | EXTRA_MODES)[mode]} | {median(mode, 'seconds_per_step'):.3f} | "
            f"{statistics.median(speed):.2f}x | {median(mode, 'peak_mb'):.0f} | "
            f"{statistics.median(memory):.2f}x |"
            if ref
            else f"| {mode} | {median(mode, 'seconds_per_step'):.3f} | - | {median(mode, 'peak_mb'):.0f} | - |"
        )
    summary = {"rounds": rounds, "targets": []}
    print("\ntargets (ratio min/median/max over rounds):")
    for name, top, bottom, key, target, sense in TARGETS:
        if top not in opts.modes or bottom not in opts.modes:
            continue
        ratios = [r[top][key] / r[bottom][key] for r in rounds]
        middle = statistics.median(ratios)
        met = {"<=": middle <= target, "<": middle < target, ">=": middle >= target}[sense]
        print(f"  {name}: {spread(ratios)} (target {sense} {target}: {'met' if met else 'MISSED'})")
        summary["targets"].append({"name": name, "ratios": ratios, "target": target, "sense": sense, "met": met})
    if opts.json:
        Path(opts.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
