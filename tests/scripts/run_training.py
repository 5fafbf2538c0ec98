"""A small LoRA Poly-DPO run for the process-level tests (kill-and-resume, multi-process): writes to --out the final
LoRA weights and first-step gradients of this rank, the logged losses, the steps this process executed and the world
size."""

from __future__ import annotations

import argparse
import json
import os
import signal

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import TrainerCallback

from vipo_trl import PolyDPOConfig, PolyDPOTrainer
from vipo_trl.testing import pickapic_dataset


class KillAt(TrainerCallback):
    """SIGKILL this very process once `step` is done: nothing gets to clean up, as with a pre-empted node."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class Record(TrainerCallback):
    """What the run did, for the tests to check: the steps it executed (a resume must run only the remaining ones),
    the world size, and the LoRA gradients of its first optimizer step (after DDP's all-reduce)."""

    def __init__(self):
        self.steps: list[int] = []
        self.first_grads: dict[str, torch.Tensor] | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps.append(state.global_step + 1)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.first_grads is None and model is not None:
            self.first_grads = {
                n: p.grad.detach().clone().contiguous() for n, p in model.named_parameters() if p.grad is not None
            }


def allow_fsdp_on_cpu() -> None:
    """accelerate decides FSDP only for accelerator devices: on CPU processes it keeps MULTI_CPU and drops the FSDP
    plugin, although torch's FSDP 2 (`fully_shard`) runs on CPU tensors over gloo. Keep the plugin there, so the
    sharded code paths (the policy's wrapping, the reference's `prepare_fsdp`, gathering the state dict) run on CPU."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *a, fsdp_plugin=None, **kw):
        original(self, *a, fsdp_plugin=fsdp_plugin, **kw)
        # every later AcceleratorState() copies PartialState's MULTI_CPU back over it: set FSDP again each time
        self.fsdp_plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)
        if self.fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP

    AcceleratorState.__init__ = init


def local_numel(parameter: torch.Tensor) -> int:
    """Entries of a parameter this rank holds: its shard under FSDP (a DTensor) or ZeRO-3 (`ds_tensor`)."""
    if hasattr(parameter, "ds_tensor"):
        return parameter.ds_tensor.numel()
    return (parameter.to_local() if hasattr(parameter, "to_local") else parameter).numel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save_steps", type=int, default=2)
    parser.add_argument("--kill_at", type=int, default=None)
    parser.add_argument("--kill_while_saving", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--full", action="store_true", help="full fine-tuning (a frozen reference copy) instead of LoRA"
    )
    parser.add_argument(
        "--cpu_fsdp",
        action="store_true",
        help="run FSDP on CPU processes (gloo), which accelerate otherwise turns into plain multi-CPU data parallelism",
    )
    parser.add_argument(
        "--deepspeed",
        action="store_true",
        help="launched under DeepSpeed (on CPU processes too: gloo)",
    )
    parser.add_argument("--gpu", action="store_true", help="run on the GPUs (the tests run on CPU processes)")
    parser.add_argument("--validation_steps", type=int, default=None, help="validation images every N steps")
    args = parser.parse_args()
    if args.cpu_fsdp:
        allow_fsdp_on_cpu()

    config = PolyDPOConfig(
        output_dir=args.out,
        resolution=16,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        save_steps=args.save_steps,
        logging_steps=1,
        report_to=[],
        # DeepSpeed on CPU processes: use_cpu would turn DeepSpeed off, and accelerate finds a backend for DeepSpeed
        # only on GPUs, so gloo is named.
        use_cpu=not (args.gpu or args.deepspeed),
        ddp_backend="gloo" if args.deepspeed and not args.gpu else None,
        disable_tqdm=True,
        learning_rate=1e-2,
        poly_alpha=0.5,
        center_crop=False,
        random_flip=True,
        seed=0,
        validation_prompts=["a red square", "a blue square"] if args.validation_steps else None,
        validation_steps=args.validation_steps or 100,
    )
    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian")
    trainer = PolyDPOTrainer(args.model, config, pickapic_dataset(12), peft_config=None if args.full else lora)
    record = Record()
    trainer.add_callback(record)
    if args.kill_at:
        trainer.add_callback(KillAt(args.kill_at))
    if args.kill_while_saving:
        save_rng = trainer._save_rng_state

        def dying_save(output_dir):  # weights and optimizer are on disk, the trainer state is not yet
            if trainer.state.global_step == args.kill_while_saving:
                os.kill(os.getpid(), signal.SIGKILL)
            save_rng(output_dir)

        trainer._save_rng_state = dying_save
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    rank = trainer.args.process_index
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if trainer.is_deepspeed_enabled and not args.full:  # the LoRA's ZeRO-3 partitions, gathered
        import deepspeed

        lora = {k: p for k, p in trainer.model.named_parameters() if "lora_" in k}
        with deepspeed.zero.GatheredParameters(list(lora.values())):
            state = {k: p.detach().clone().contiguous() for k, p in lora.items()}
    elif args.full or sharded:  # gathered whole from every shard (FSDP, ZeRO-3) as save_model would
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        state = {k: v.detach().float().contiguous() for k, v in (state or {}).items() if args.full or "lora_" in k}
    else:
        state = {k: v.detach().contiguous() for k, v in trainer.model.state_dict().items() if "lora_" in k}
    save_file(state, os.path.join(args.out, f"final-rank{rank}.safetensors"))
    if not args.full and not sharded:  # (under FSDP/ZeRO each rank holds a shard of each gradient)
        save_file(record.first_grads or {}, os.path.join(args.out, f"first-step-grads-rank{rank}.safetensors"))
    if rank == 0:
        losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
        with open(os.path.join(args.out, "losses.json"), "w") as f:
            json.dump(losses, f)
        run = {
            "executed_steps": record.steps,
            "world_size": trainer.args.world_size,
            "fsdp": trainer.is_fsdp_enabled,
            "deepspeed": trainer.is_deepspeed_enabled,
            "reference": type(trainer.ref_denoiser).__name__ if trainer.ref_denoiser is not None else None,
        }
        if trainer.ref_denoiser is not None:  # the reference's parameters held by this rank, against the whole
            params = list(trainer.ref_denoiser.parameters())
            run["reference_numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in params)
            run["reference_local_numel"] = sum(local_numel(p) for p in params)
        with open(os.path.join(args.out, "run.json"), "w") as f:
            json.dump(run, f)
    torch.distributed.barrier() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main()
