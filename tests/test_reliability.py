"""Process-level reliability: a SIGKILLed run resumes to the uninterrupted result, a kill while saving leaves the
previous checkpoint usable, and two processes equal one process at the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = str(Path(__file__).parent / "scripts" / "run_training.py")


def run(*args, check=True):
    result = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def final_state(out, rank=0):
    return load_file(os.path.join(out, f"final-rank{rank}.safetensors"))


def losses(out):
    return {int(k): v for k, v in json.loads(Path(out, "losses.json").read_text()).items()}


def run_facts(out):
    return json.loads(Path(out, "run.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_sd_path):
    out = tmp_path_factory.mktemp("full")
    run("--model", tiny_sd_path, "--out", out)
    return out


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_the_uninterrupted_run(tmp_path, tiny_sd_path, uninterrupted):
    killed = run("--model", tiny_sd_path, "--out", tmp_path, "--kill_at", 5, check=False)
    assert killed.returncode == -9  # really killed, no clean-up
    assert (tmp_path / "checkpoint-4").is_dir() and not (tmp_path / "final-rank0.safetensors").exists()
    run("--model", tiny_sd_path, "--out", tmp_path, "--resume")
    assert run_facts(tmp_path)["executed_steps"] == [5, 6]  # resumed after checkpoint-4, not restarted
    expected, got = final_state(uninterrupted), final_state(tmp_path)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])
    for step in (5, 6):
        assert losses(tmp_path)[step] == pytest.approx(losses(uninterrupted)[step], rel=1e-6)


@pytest.mark.slow
def test_a_kill_while_saving_leaves_the_previous_checkpoint_usable(tmp_path, tiny_sd_path, uninterrupted):
    from vipo_trl.trainer.poly_dpo_trainer import last_complete_checkpoint

    killed = run("--model", tiny_sd_path, "--out", tmp_path, "--kill_while_saving", 4, check=False)
    assert killed.returncode == -9
    assert (tmp_path / "checkpoint-4").is_dir() and not (tmp_path / "checkpoint-4" / "trainer_state.json").exists()
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    run("--model", tiny_sd_path, "--out", tmp_path, "--resume")
    assert run_facts(tmp_path)["executed_steps"] == [3, 4, 5, 6]  # from the last complete checkpoint
    expected, got = final_state(uninterrupted), final_state(tmp_path)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])


@pytest.mark.slow
def test_two_processes_equal_one_process_at_the_same_global_batch(tmp_path, tiny_sd_path):
    one = tmp_path / "one"
    run("--model", tiny_sd_path, "--out", one, "--batch", 4, "--steps", 3, "--save_steps", 100)
    two = tmp_path / "two"
    # --multi_gpu makes accelerate start one process per rank; on a machine without GPUs they run on the CPU (gloo).
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    accelerate += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    accelerate += ["--main_process_port", "29517"]
    launch = [*accelerate, SCRIPT, "--model", tiny_sd_path, "--out", str(two), "--batch", "2", "--steps", "3"]
    launch += ["--save_steps", "100"]
    result = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_facts(two)["world_size"] == 2 and run_facts(one)["world_size"] == 1
    # Step 1 (before Adam and rounding compound): the all-reduced gradient of 2 x 2 pairs is the gradient of the
    # same 4 pairs in one process.
    grads_one = load_file(os.path.join(one, "first-step-grads-rank0.safetensors"))
    grads_two = load_file(os.path.join(two, "first-step-grads-rank0.safetensors"))
    assert grads_one.keys() == grads_two.keys() and len(grads_one) > 0
    for key in grads_one:
        # Tight: 1e-4 of the tensor's largest entry (near-zero entries differ by float rounding, ~1e-8).
        scale = grads_one[key].abs().max().item()
        torch.testing.assert_close(grads_two[key], grads_one[key], rtol=1e-4, atol=1e-4 * scale)
    rank0, rank1, single = final_state(two, 0), final_state(two, 1), final_state(one, 0)
    # Same rows, same noise per row, gradients averaged: the same losses...
    for step, value in losses(one).items():
        assert losses(two)[step] == pytest.approx(value, rel=1e-4)
    for key in single:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)  # DDP keeps ranks identical
        # ...and the same weights, up to float rounding (the all-reduce sums in another order) that Adam and a
        # learning rate of 1e-2 amplify on near-zero gradients.
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-2, atol=2e-3)


def fsdp_launch(port: int) -> list[str]:
    """Two CPU processes under FSDP 2 (gloo). accelerate turns FSDP on CPUs into plain multi-CPU data parallelism;
    the script's --cpu_fsdp keeps the FSDP plugin, so the sharded code paths run here as they would on GPUs."""
    config = str(Path(__file__).parent / "scripts" / "fsdp_cpu.yaml")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
    return [*launch, "--main_process_port", str(port), SCRIPT, "--cpu_fsdp"]


# The runs several tests compare against are made once per module: 1 process at batch 2 (full fine-tuning, LoRA),
# and 2 processes at batch 1 each under FSDP and ZeRO-3 (full fine-tuning, checkpoints at steps 2 and 3), which the
# equality tests compare with 1 process and the resume tests resume from a copy of.
# The full runs also make validation images at steps 0, 2 and 3 (every rank joins the generation when sharded).
ONE_PROCESS = ["--steps", "3", "--save_steps", "100", "--batch", "2"]
TWO_PROCESSES_FULL = ["--full", "--batch", "1", "--steps", "3", "--save_steps", "2", "--validation_steps", "2"]


@pytest.fixture(scope="module")
def one_process_full(tmp_path_factory, tiny_sd_path) -> Path:
    out = tmp_path_factory.mktemp("one-full")
    run("--model", tiny_sd_path, "--full", *ONE_PROCESS, "--validation_steps", "2", "--out", out)
    return out


@pytest.fixture(scope="module")
def one_process_lora(tmp_path_factory, tiny_sd_path) -> Path:
    out = tmp_path_factory.mktemp("one-lora")
    run("--model", tiny_sd_path, *ONE_PROCESS, "--out", out)
    return out


def two_process_full_run(launch: list[str], out: Path, model: str) -> Path:
    launch_two(launch, "--model", model, *TWO_PROCESSES_FULL, "--out", out)
    return out


@pytest.fixture(scope="module")
def fsdp_full(tmp_path_factory, tiny_sd_path) -> Path:
    return two_process_full_run(fsdp_launch(29561), tmp_path_factory.mktemp("fsdp-full"), tiny_sd_path)


@pytest.fixture(scope="module")
def zero3_full(tmp_path_factory, tiny_sd_path) -> Path:
    return two_process_full_run(zero3_launch(29586), tmp_path_factory.mktemp("zero3-full"), tiny_sd_path)


def assert_full_fine_tuning_equals_one_process(two: Path, one: Path) -> dict:
    """A 2-process full fine-tuning run at batch 1 each against 1 process at batch 2 (same rows, same noise per row,
    gradients reduced over 2 ranks): the same losses and weights up to float summation order, which beta amplifies in
    the loss and Adam at a learning rate of 1e-2 compounds (measured 2026-12-02, FSDP, ZeRO-2 and ZeRO-3 alike: 8e-5
    relative apart at step 1, 1e-4 at step 2, 3.2e-4 at step 3; a different row or noise on one rank is percents
    apart at step 1); the checkpoint holds the whole model, gathered from both ranks, loadable by diffusers. Returns
    the 2-process run's facts."""
    from diffusers import UNet2DConditionModel

    for step, value in losses(one).items():
        assert losses(two)[step] == pytest.approx(value, rel=2e-4 if step == 1 else 1e-3), step
    single, sharded = final_state(one), final_state(two)
    assert single.keys() == sharded.keys()
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-2, atol=2e-3)
    saved = UNet2DConditionModel.from_pretrained(two / "checkpoint-3").state_dict()
    for key in sharded:
        torch.testing.assert_close(saved[key], sharded[key], rtol=0, atol=0)
    facts = run_facts(two)
    assert facts["world_size"] == 2
    return facts


@pytest.mark.slow
def test_fsdp_full_fine_tuning_shards_the_reference_and_equals_one_process(fsdp_full, one_process_full):
    facts = assert_full_fine_tuning_equals_one_process(fsdp_full, one_process_full)
    assert facts["fsdp"]
    # The frozen reference copy is sharded like the policy (prepared as trl prepares its reference), not whole.
    assert facts["reference"].startswith("FSDP")
    assert facts["reference_local_numel"] <= facts["reference_numel"] // 2 + 64


def launch_two(launch: list[str], *args) -> None:
    result = subprocess.run([*launch, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_lora_equals_one_process(launch: list[str], tmp_path: Path, model: str, one: Path) -> dict:
    """A 2-process LoRA run at batch 1 each against 1 process at batch 2 (`one`): the same losses and saved LoRA, up
    to float summation order. Returns the 2-process run's facts."""
    two = tmp_path / "two"
    launch_two(launch, "--model", model, "--steps", "3", "--save_steps", "100", "--out", two, "--batch", 1)
    for step, value in losses(one).items():  # (step 2: 1.2e-4 apart, after one Adam step on summation-order noise)
        assert losses(two)[step] == pytest.approx(value, rel=1e-3)
    lora_one = load_file(one / "checkpoint-3" / "pytorch_lora_weights.safetensors")
    lora_two = load_file(two / "checkpoint-3" / "pytorch_lora_weights.safetensors")
    assert lora_one.keys() == lora_two.keys() and len(lora_one) > 0
    for key in lora_one:
        torch.testing.assert_close(lora_two[key], lora_one[key], rtol=1e-2, atol=2e-3)
    return run_facts(two)


def assert_resume_matches_uninterrupted(launch: list[str], finished: Path, tmp_path: Path, model: str) -> None:
    """Full fine-tuning, 2 processes: a copy of a finished 3-step run that saved at 2 and 3 (`finished`), with
    checkpoint-3 and the results deleted, as if killed after checkpoint-2; resume: only step 3 runs, and the weights
    equal the uninterrupted run's exactly."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    uninterrupted = final_state(finished)
    shutil.rmtree(out / "checkpoint-3")
    for rank in (0, 1):
        (out / f"final-rank{rank}.safetensors").unlink()
    (out / "run.json").unlink()
    launch_two(launch, "--model", model, *TWO_PROCESSES_FULL, "--out", out, "--resume")
    assert run_facts(out)["executed_steps"] == [3]  # resumed after checkpoint-2, not restarted
    resumed = final_state(out)
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0)


@pytest.mark.slow
def test_fsdp_lora_trains_and_saves_the_lora_of_one_process(tmp_path, tiny_sd_path, one_process_lora):
    """LoRA's reference runs through the policy's own FSDP module (adapters disabled)."""
    facts = assert_lora_equals_one_process(fsdp_launch(29562), tmp_path, tiny_sd_path, one_process_lora)
    assert facts["fsdp"] and facts["world_size"] == 2


@pytest.mark.slow
def test_fsdp_resume_matches_the_uninterrupted_run(tmp_path, tiny_sd_path, fsdp_full):
    """Resuming loads the sharded module from accelerate's FSDP checkpoint, each rank its shards."""
    assert_resume_matches_uninterrupted(fsdp_launch(29563), fsdp_full, tmp_path, tiny_sd_path)


def zero3_launch(port: int, config: Path | None = None) -> list[str]:
    """Two CPU processes under DeepSpeed ZeRO-3 (gloo: DeepSpeed's CPU accelerator without oneCCL)."""
    config = config or Path(__file__).parent / "scripts" / "zero3_cpu.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    return [*launch, "--main_process_port", str(port), SCRIPT, "--deepspeed"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3, 2])
def test_deepspeed_full_fine_tuning_equals_one_process_with_a_zero3_sharded_reference(
    tmp_path, tiny_sd_path, stage, one_process_full, request
):
    """Also the frozen text encoder: transformers would load it partitioned under ZeRO-3 (empty parameters outside
    any DeepSpeed engine); the trainer loads it whole."""
    if stage == 3:
        two = request.getfixturevalue("zero3_full")
    else:
        config = tmp_path / f"zero{stage}.yaml"
        yaml = (Path(__file__).parent / "scripts" / "zero3_cpu.yaml").read_text()
        config.write_text(yaml.replace("zero_stage: 3", f"zero_stage: {stage}"))
        two = two_process_full_run(zero3_launch(29580 + stage, config), tmp_path / "two", tiny_sd_path)
    facts = assert_full_fine_tuning_equals_one_process(two, one_process_full)
    assert facts["deepspeed"]
    # The frozen reference copy is a DeepSpeed engine as trl's prepare_deepspeed makes it: under ZeRO-3 partitioned
    # like the policy, not whole on each rank; under ZeRO-2 (which shards optimizer state only) whole.
    assert facts["reference"] == "DeepSpeedEngine"
    if stage == 3:
        assert facts["reference_local_numel"] <= facts["reference_numel"] // 2 + 64
    else:
        assert facts["reference_local_numel"] == facts["reference_numel"]


@pytest.mark.slow
def test_zero3_lora_is_saved_without_gathering_the_whole_network(tmp_path, tiny_sd_path, one_process_lora):
    """With `zero3_save_16bit_model: false` DeepSpeed gathers no weights for saving; the LoRA is still written (the
    trainer gathers only its parameters) and equals the LoRA of one process."""
    config = tmp_path / "zero3_no_gather.yaml"
    yaml = (Path(__file__).parent / "scripts" / "zero3_cpu.yaml").read_text()
    config.write_text(yaml.replace("zero3_save_16bit_model: true", "zero3_save_16bit_model: false"))
    facts = assert_lora_equals_one_process(zero3_launch(29584, config), tmp_path, tiny_sd_path, one_process_lora)
    assert facts["deepspeed"] and facts["reference"] is None  # LoRA: the reference is the adapters disabled


@pytest.mark.slow
@pytest.mark.parametrize("sharded", ["fsdp_full", "zero3_full"])
def test_validation_images_of_a_sharded_run_are_those_of_one_process(sharded, one_process_full, request):
    """validation_prompts under FSDP and ZeRO-3: every rank joins the generation (each forward gathers weights from
    all ranks; rank 0 generating alone broke the collectives), rank 0 saves the images, and they are the images of
    one process with the same weights (up to the float rounding the weights differ by after training)."""
    import numpy as np
    from PIL import Image

    two = request.getfixturevalue(sharded)
    for step in (0, 2, 3):
        sharded_image, single_image = (
            np.asarray(Image.open(run / "validation" / f"step-{step}.png"), dtype=np.int16)
            for run in (two, one_process_full)
        )
        assert sharded_image.shape == single_image.shape == (16, 32, 3)
        assert np.abs(sharded_image - single_image).mean() < 2, step


@pytest.mark.slow
def test_zero3_resume_matches_the_uninterrupted_run(tmp_path, tiny_sd_path, zero3_full):
    """Resuming loads DeepSpeed's partitioned checkpoint (model and optimizer states), each rank its partition."""
    assert_resume_matches_uninterrupted(zero3_launch(29585), zero3_full, tmp_path, tiny_sd_path)
