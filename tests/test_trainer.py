"""PolyDPOTrainer end to end on a tiny Stable Diffusion saved with save_pretrained and loaded by path."""

import copy
import json
import os
import re

import numpy as np
import pytest
import torch
from peft import LoraConfig
from transformers import TrainerCallback

from vipo_trl import PolyDPOConfig, PolyDPOTrainer
from vipo_trl.losses import implicit_rewards
from vipo_trl.testing import pickapic_dataset

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def config(tmp_path, **kw):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        resolution=16,
        per_device_train_batch_size=2,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        learning_rate=1e-3,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    defaults.update(kw)
    return PolyDPOConfig(**defaults)


def lora(r=4):
    return LoraConfig(r=r, lora_alpha=r, target_modules=LORA_TARGETS, init_lora_weights="gaussian")


def one_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def trained_and_saved(*args, **kwargs) -> PolyDPOTrainer:
    """A `PolyDPOTrainer(*args, **kwargs)` run to its end and saved: an earlier run for the next one to use."""
    trainer = PolyDPOTrainer(*args, **kwargs)
    trainer.train()
    trainer.save_model()
    return trainer


class StepRecorder(TrainerCallback):
    """The optimizer steps a run executes (1-based): a resume must run only the remaining ones."""

    def __init__(self):
        self.steps = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps.append(state.global_step + 1)


def count_forwards(module):
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_lora_run_changes_only_lora_weights_and_reference_is_the_base(tmp_path, tiny_sd_path):
    from diffusers import UNet2DConditionModel

    trainer = PolyDPOTrainer(
        tiny_sd_path, config(tmp_path, max_steps=3, poly_alpha=0.5), pickapic_dataset(8), peft_config=lora()
    )
    unet = trainer.model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    trainer.train()
    after = unet.state_dict()
    lora_keys = [k for k in after if "lora_" in k]
    assert lora_keys
    assert all(torch.equal(before[k], after[k]) for k in after if "lora_" not in k)
    assert any(not torch.equal(before[k], after[k]) for k in lora_keys)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == {k for k in lora_keys if "lora_" in k}

    # The reference (adapters disabled) is exactly the base UNet; the policy is not any more.
    base = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    batch = one_batch(trainer)
    gens = trainer._pair_generators(batch["row_index"], salt=0)
    latents = trainer.family.encode_images(batch["pixel_values_chosen"], gens)
    cond = trainer.family.encode_conditioning(batch)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        ref = trainer._reference_prediction(unet, latents, t, cond)
        expected = base(latents, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        policy = trainer.family.predict(unet, latents, t, cond, torch.float32)
    torch.testing.assert_close(ref, expected)
    assert not torch.allclose(policy, expected)

    logged = trainer.state.log_history[0]
    for key in ("loss/poly_dpo", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert key in logged


def test_ref_model_from_an_earlier_lora_run_is_that_model(tmp_path, tiny_sd_path):
    """Round 2 of an alignment: the reference is the base with round 1's LoRA, held as a second, frozen adapter."""
    from diffusers import StableDiffusionPipeline

    first = PolyDPOTrainer(
        tiny_sd_path,
        config(tmp_path, output_dir=str(tmp_path / "round1"), max_steps=3, learning_rate=5e-2),
        pickapic_dataset(8),
        peft_config=lora(),
    )
    first.train()
    first.save_model()
    second = PolyDPOTrainer(
        tiny_sd_path,
        config(tmp_path, output_dir=str(tmp_path / "round2")),
        pickapic_dataset(8),
        peft_config=lora(),
        ref_model=str(tmp_path / "round1"),
    )
    assert second.ref_denoiser is None and second.ref_adapter == "reference"  # no second copy of the base
    trainable = {n for n, p in second.model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)  # the reference LoRA is frozen

    round1 = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    round1.load_lora_weights(str(tmp_path / "round1"))
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None).unet
    batch = one_batch(second)
    gens = second._pair_generators(batch["row_index"], salt=0)
    latents = second.family.encode_images(batch["pixel_values_chosen"], gens)
    cond = second.family.encode_conditioning(batch)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        ref = second._reference_prediction(second.model, latents, t, cond)
        expected = round1.unet(latents, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        plain = base(latents, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
    torch.testing.assert_close(ref, expected, rtol=1e-4, atol=1e-5)
    assert (ref - plain).abs().max() > 1e-3  # round 1 moved the model: the reference is not the base
    # Training round 2 updates only its own LoRA; round 1's stays as loaded.
    ref_before = {n: p.clone() for n, p in second.model.named_parameters() if ".reference." in n}
    second.train()
    assert ref_before and all(
        torch.equal(p, ref_before[n]) for n, p in second.model.named_parameters() if n in ref_before
    )
    with torch.no_grad():
        again = second._reference_prediction(second.model, latents, t, cond)
    torch.testing.assert_close(again, expected, rtol=1e-4, atol=1e-5)
    # Full fine-tuning: the frozen reference copy is the base with round 1's LoRA fused in.
    full = PolyDPOTrainer(tiny_sd_path, config(tmp_path), pickapic_dataset(8), ref_model=str(tmp_path / "round1"))
    with torch.no_grad():
        fused = full._reference_prediction(full.model, latents, t, cond)
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in full.ref_denoiser.parameters())


def hub_cache_repo(cache, repo_id: str, source) -> None:
    """`source`'s files as the Hub cache holds a downloaded snapshot of `repo_id` (read offline, as the tests run)."""
    import shutil

    storage = cache / ("models--" + repo_id.replace("/", "--"))
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text("a" * 40)
    shutil.copytree(source, storage / "snapshots" / ("a" * 40))


def test_ref_model_can_be_a_hub_repo_of_a_lora_or_of_a_pipeline(tmp_path, tiny_sd_path, monkeypatch):
    """As the command line's help says: `ref_model` a hub id, of an earlier round pushed to the Hub (held as a frozen
    adapter, recorded by its id) or of a whole pipeline (its denoiser, frozen); an id the Hub does not give is one
    line naming it."""
    from diffusers import UNet2DConditionModel
    from huggingface_hub import constants

    trained_and_saved(
        tiny_sd_path, config(tmp_path, output_dir=str(tmp_path / "round1"), max_steps=2, learning_rate=5e-2),
        pickapic_dataset(8), peft_config=lora(),
    )  # fmt: skip
    cache = tmp_path / "hub-cache"
    hub_cache_repo(cache, "alice/round1", tmp_path / "round1")
    hub_cache_repo(cache, "alice/base", tiny_sd_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    local = PolyDPOTrainer(tiny_sd_path, config(tmp_path), pickapic_dataset(8), peft_config=lora(),
                           ref_model=str(tmp_path / "round1"))  # fmt: skip
    hub = PolyDPOTrainer(tiny_sd_path, config(tmp_path), pickapic_dataset(8), peft_config=lora(),
                         ref_model="alice/round1")  # fmt: skip
    assert hub.ref_adapter == "reference" and hub.ref_denoiser is None and hub.ref_model_name == "alice/round1"
    batch = one_batch(hub)
    latents = hub.family.encode_images(batch["pixel_values_chosen"], hub._pair_generators(batch["row_index"], 0))
    cond = hub.family.encode_conditioning(batch)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        expected = local._reference_prediction(local.model, latents, t, cond)
        torch.testing.assert_close(hub._reference_prediction(hub.model, latents, t, cond), expected)
        base = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
        plain = base(latents, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        assert (expected - plain).abs().max() > 1e-3  # round 1 is not the base

        full = PolyDPOTrainer(tiny_sd_path, config(tmp_path), pickapic_dataset(8), ref_model="alice/base")
        torch.testing.assert_close(full._reference_prediction(full.model, latents, t, cond), plain)
    with pytest.raises(ValueError, match=r"ref_model='a/nowhere' is no local folder, and the Hub did not give it"):
        PolyDPOTrainer(tiny_sd_path, config(tmp_path), pickapic_dataset(8), peft_config=lora(), ref_model="a/nowhere")


def test_an_earlier_loras_dropout_does_not_make_the_reference_random(tmp_path, tiny_sd_path):
    """A round-1 LoRA trained with dropout (the command line's default is 0.05), held as round 2's reference: in
    training mode its forward is still round 1's model, the same on every call."""
    from diffusers import StableDiffusionPipeline

    dropout = LoraConfig(**{**lora().to_dict(), "lora_dropout": 0.5})
    args = config(tmp_path, output_dir=str(tmp_path / "round1"), max_steps=2, learning_rate=5e-2)
    trained_and_saved(tiny_sd_path, args, pickapic_dataset(8), peft_config=dropout)
    second = PolyDPOTrainer(
        tiny_sd_path, config(tmp_path), pickapic_dataset(8), peft_config=dropout, ref_model=str(tmp_path / "round1")
    )
    round1 = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    round1.load_lora_weights(str(tmp_path / "round1"))
    batch = one_batch(second)
    latents = second.family.encode_images(batch["pixel_values_chosen"], second._pair_generators(batch["row_index"], 0))
    cond = second.family.encode_conditioning(batch)
    t = torch.tensor([10, 500])
    second.model.train()  # as Trainer keeps it
    with torch.no_grad():
        refs = [second._reference_prediction(second.model, latents, t, cond) for _ in range(2)]
        expected = round1.unet.eval()(latents, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
    torch.testing.assert_close(refs[0], refs[1], rtol=0, atol=0)
    torch.testing.assert_close(refs[0], expected, rtol=1e-4, atol=1e-5)


def test_model_can_be_a_loaded_pipeline(tmp_path, tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    trainer = PolyDPOTrainer(pipe, config(tmp_path), pickapic_dataset(4), peft_config=lora())
    assert trainer.model is pipe.unet and trainer.family.name_or_path == tiny_sd_path
    trainer.train()
    assert trainer.state.global_step == 2
    with pytest.raises(ValueError, match="needs a peft_config|pass a peft_config"):
        PolyDPOTrainer(tiny_sd_path, config(tmp_path), pickapic_dataset(4), quantization_config=object())


def test_saved_lora_loads_into_the_official_pipeline_and_changes_the_image(tmp_path, tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    trainer = PolyDPOTrainer(
        tiny_sd_path, config(tmp_path, max_steps=4, learning_rate=5e-2), pickapic_dataset(8), peft_config=lora()
    )
    trainer.train()
    trainer.save_model()
    out = trainer.args.output_dir
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        g = torch.Generator().manual_seed(0)
        return pipe("a red square", num_inference_steps=3, height=16, width=16, generator=g, output_type="np").images

    base_image = generate()
    pipe.load_lora_weights(out)
    lora_image = generate()
    assert np.abs(lora_image - base_image).max() > 1e-3

    # The weights that landed in the pipeline are the ones trained.
    trained = {k: v for k, v in trainer.model.state_dict().items() if "lora_" in k}
    loaded = {k.replace(".default_0.", ".default."): v for k, v in pipe.unet.state_dict().items() if "lora_" in k}
    assert trained.keys() == loaded.keys()
    for k in trained:
        torch.testing.assert_close(loaded[k], trained[k])


def test_a_lora_trained_with_dropout_samples_without_it_once_loaded(tmp_path, tiny_sd_path):
    """Dropout is for training: loaded into the official pipeline (`load_lora_weights`, which keeps a LoRA's dropout
    in training mode in an eval-mode pipeline) or by vipo-trl's own loader (also a file whose metadata names a
    dropout, as earlier builds wrote), the same seed gives the same image."""
    import json

    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from vipo_trl.models.generation import load_aligned_weights

    dropout = LoraConfig(**{**lora().to_dict(), "lora_dropout": 0.5})
    trainer = PolyDPOTrainer(
        tiny_sd_path, config(tmp_path, max_steps=2, learning_rate=5e-2), pickapic_dataset(8), peft_config=dropout
    )
    trainer.train()
    trainer.save_model()
    out = trainer.args.output_dir
    path = os.path.join(out, "pytorch_lora_weights.safetensors")
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["lora_adapter_metadata"])["unet.lora_dropout"] == 0.0
    with open(os.path.join(out, "vipo_trl_model.json")) as f:
        assert json.load(f)["lora_dropout"] == 0.5  # what it trained with, recorded beside the weights

    def twice(pipe):
        pipe.set_progress_bar_config(disable=True)
        return [
            pipe("a red square", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
            for _ in range(2)
        ]  # fmt: skip

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    pipe.load_lora_weights(out)
    first, second = twice(pipe)
    np.testing.assert_array_equal(first, second)

    older = json.loads(metadata["lora_adapter_metadata"])
    older["unet.lora_dropout"] = 0.5
    save_file(load_file(path), path, metadata={**metadata, "lora_adapter_metadata": json.dumps(older)})
    first, second = twice(load_aligned_weights(StableDiffusionPipeline.from_pretrained(tiny_sd_path), out))
    np.testing.assert_array_equal(first, second)


def _unloadable_peft_configs():
    from peft import LoHaConfig

    return [
        (LoHaConfig(r=4, alpha=4, target_modules=LORA_TARGETS), "peft_config is a LoHaConfig"),
        (LoraConfig(r=4, target_modules=LORA_TARGETS, modules_to_save=["conv_in"]), "modules_to_save=['conv_in']"),
        (LoraConfig(r=4, target_modules=LORA_TARGETS, bias="lora_only"), "bias='lora_only'"),
        (LoraConfig(r=4, target_parameters=["weight"]), "target_parameters=['weight']"),
        (LoraConfig(r=0, target_modules=LORA_TARGETS), "LoraConfig.r=0"),
        (LoraConfig(r=4, target_modules=LORA_TARGETS, init_lora_weights="pissa"), "init_lora_weights='pissa' rewrites"),
    ]


@pytest.mark.parametrize("peft_config, expected", _unloadable_peft_configs(), ids=lambda v: str(v)[:24])
def test_a_lora_the_pipeline_could_not_load_is_refused_before_the_model_loads(tmp_path, peft_config, expected):
    """`load_lora_weights` refuses a file holding whole modules or base biases, and loads no other adapter type:
    found out after training, that is the whole run lost; an initialisation that rewrites the base weights (PiSSA)
    would make the reference another model. (The model folder does not exist: loading it fails with another
    message.)"""
    import re

    with pytest.raises(ValueError, match=re.escape(expected)):
        PolyDPOTrainer(str(tmp_path / "no-model"), config(tmp_path), pickapic_dataset(4), peft_config=peft_config)


def test_full_finetune_uses_a_frozen_copy_and_saves_the_unet(tmp_path, tiny_sd_path):
    from diffusers import UNet2DConditionModel

    trainer = PolyDPOTrainer(tiny_sd_path, config(tmp_path, loss_type="diffusion_dpo"), pickapic_dataset(8))
    ref_before = {k: v.clone() for k, v in trainer.ref_denoiser.state_dict().items()}
    policy_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.ref_denoiser is not trainer.model
    assert all(p.requires_grad for p in trainer.model.parameters())
    trainer.train()
    assert all(torch.equal(ref_before[k], v) for k, v in trainer.ref_denoiser.state_dict().items())
    assert any(not torch.equal(policy_before[k], v) for k, v in trainer.model.state_dict().items())

    trainer.save_model()
    reloaded = UNet2DConditionModel.from_pretrained(trainer.args.output_dir)
    for k, v in trainer.model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[k], v)


@pytest.mark.parametrize("loss_type, lora_on", [("mapo", True), ("sft", False), ("mapo", False)])
def test_reference_free_loss_makes_no_reference_forward(tmp_path, tiny_sd_path, loss_type, lora_on):
    trainer = PolyDPOTrainer(
        tiny_sd_path,
        config(tmp_path, loss_type=loss_type, max_steps=2),
        pickapic_dataset(8),
        peft_config=lora() if lora_on else None,
    )
    assert trainer.ref_denoiser is None and not trainer.needs_reference
    calls = count_forwards(trainer.model)
    trainer.train()
    assert len(calls) == 2  # one policy forward per step, nothing else
    assert "rewards/chosen" not in trainer.state.log_history[0]


def test_a_loss_that_reads_only_the_chosen_image_never_encodes_or_runs_the_rejected(tmp_path, tiny_sd_path):
    def batch_sizes(loss_type):
        trainer = PolyDPOTrainer(
            tiny_sd_path, config(tmp_path, loss_type=loss_type, max_steps=1), pickapic_dataset(8), peft_config=lora()
        )
        sizes = {"vae": [], "denoiser": []}
        trainer.family.vae.encoder.register_forward_hook(lambda m, a, o: sizes["vae"].append(a[0].shape[0]))
        trainer.model.register_forward_hook(lambda m, a, o: sizes["denoiser"].append(a[0].shape[0]))
        trainer.train()
        return trainer, sizes

    sft, sizes = batch_sizes(["sft"])  # 2 pairs per step
    assert not sft.needs_rejected and sizes == {"vae": [2], "denoiser": [2]}
    assert "errors/policy_rejected" not in sft.state.log_history[0]
    _, sizes = batch_sizes(["mapo"])  # reference-free, but reads the rejected image
    assert sizes == {"vae": [4], "denoiser": [4]}
    _, sizes = batch_sizes(["poly_dpo", "sft"])  # policy and reference forwards on both images
    assert sizes == {"vae": [4], "denoiser": [4, 4]}


def test_reference_loss_makes_exactly_one_reference_forward(tmp_path, tiny_sd_path):
    trainer = PolyDPOTrainer(tiny_sd_path, config(tmp_path), pickapic_dataset(8), peft_config=lora())
    calls = count_forwards(trainer.model)
    trainer.train()
    assert len(calls) == 4  # policy + reference per step, on the same network


def test_the_network_and_its_dtype_are_worked_out_once_per_wrapped_model(tmp_path, tiny_sd_path, monkeypatch):
    """Unwrapping the model and reading its dtype walk every submodule: done once for the wrapped model a run trains,
    not on every forward; another wrapper object is unwrapped afresh."""
    trainer = PolyDPOTrainer(tiny_sd_path, config(tmp_path, max_steps=3), pickapic_dataset(8), peft_config=lora())
    unwrapped, steps = [], StepRecorder()
    unwrap = trainer.accelerator.unwrap_model
    monkeypatch.setattr(
        trainer.accelerator,
        "unwrap_model",
        lambda m, *a, **k: (steps.steps and unwrapped.append(m)) or unwrap(m, *a, **k),
    )
    trainer.add_callback(steps)
    trainer.train()  # 3 steps, each a reference and a policy forward
    assert steps.steps == [1, 2, 3] and len(unwrapped) == 1  # during the steps: once, at the first forward
    other = copy.deepcopy(trainer.model).to(torch.float64)  # another model object: not the cached one
    assert trainer._unwrapped(other) == (other, torch.float64)
    assert trainer._unwrapped(trainer.model_wrapped)[0] is trainer.model


def test_combined_losses_are_the_weighted_sum(tmp_path, tiny_sd_path):
    trainer = PolyDPOTrainer(
        tiny_sd_path,
        config(tmp_path, loss_type=["poly_dpo", "sft"], loss_weights=[1.0, 0.1], poly_alpha=0.3),
        pickapic_dataset(8),
        peft_config=lora(),
    )
    batch = one_batch(trainer)
    trainer.model.train()
    loss, metrics = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    torch.testing.assert_close(loss.detach(), metrics["loss/poly_dpo"] + 0.1 * metrics["loss/sft"])
    errors = trainer.denoising_errors(trainer.model, batch, salt=0)
    torch.testing.assert_close(metrics["loss/sft"], errors.policy_chosen.mean().detach())
    chosen, rejected = implicit_rewards(errors, trainer.beta)
    torch.testing.assert_close(metrics["rewards/margins"], (chosen - rejected).mean().detach())


def test_label_smoothing_reaches_the_robust_loss(tmp_path, tiny_sd_path):
    trainer = PolyDPOTrainer(
        tiny_sd_path, config(tmp_path, loss_type="robust", label_smoothing=0.2), pickapic_dataset(8), peft_config=lora()
    )
    torch.manual_seed(0)
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:  # a policy away from the reference: at logits 0, robust DPO and DPO agree
            param.data.normal_(0, 0.5)
    batch = one_batch(trainer)
    trainer.model.train()  # training noise (salt = step 0), as below
    loss = trainer.compute_loss(trainer.model, batch)
    chosen, rejected = implicit_rewards(trainer.denoising_errors(trainer.model, batch, salt=0), trainer.beta)
    logits = (chosen - rejected).detach()
    assert logits.abs().min() > 0.1
    logsigmoid = torch.nn.functional.logsigmoid
    robust = ((-0.8 * logsigmoid(logits) + 0.2 * logsigmoid(-logits)) / 0.6).mean()
    torch.testing.assert_close(loss.detach(), robust)


def test_pair_noise_depends_on_the_row_not_the_batch(tmp_path, tiny_sd_path):
    args = config(tmp_path, random_flip=False)
    trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(8), peft_config=lora())
    collate = trainer.data_collator
    data = trainer.train_dataset
    trainer.model.eval()
    both = trainer._prepare_inputs(collate([data[3], data[5]]))
    alone = trainer._prepare_inputs(collate([data[5]]))
    with torch.no_grad():
        e_both = trainer.denoising_errors(trainer.model, both, salt=7)
        e_alone = trainer.denoising_errors(trainer.model, alone, salt=7)
        e_other_step = trainer.denoising_errors(trainer.model, alone, salt=8)
    torch.testing.assert_close(e_both.policy_chosen[1:], e_alone.policy_chosen)
    torch.testing.assert_close(e_both.ref_rejected[1:], e_alone.ref_rejected)
    assert not torch.allclose(e_alone.policy_chosen, e_other_step.policy_chosen)


def test_empty_prompts_replace_the_drawn_pairs_prompts_for_policy_and_reference(tmp_path, tiny_sd_path):
    args = config(tmp_path, proportion_empty_prompts=0.5)
    trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(8), peft_config=lora())
    family, data, collate = trainer.family, trainer.train_dataset, trainer.data_collator
    empty = trainer.empty_prompt["encoder_hidden_states"][0]
    seen = []  # the prompt embeddings of each forward: the reference's, then the policy's
    predict = family.predict
    family.predict = lambda net, x, t, cond, dtype: (
        seen.append(cond["encoder_hidden_states"]) or predict(net, x, t, cond, dtype)
    )

    def dropped_rows(rows, salt):
        batch = trainer._prepare_inputs(collate([data[i] for i in rows]))
        prompts = family.encode_prompts(batch["prompts"])["encoder_hidden_states"]
        seen.clear()
        with torch.no_grad():
            trainer.denoising_errors(trainer.model, batch, salt)
        reference, policy = seen
        assert torch.equal(reference, policy)
        chosen, rejected = policy.chunk(2)
        assert torch.equal(chosen, rejected)  # both images of a pair lose their prompt together
        dropped = []
        for row, embeds, prompt in zip(batch["row_index"], chosen, prompts):
            if torch.equal(embeds, empty):
                dropped.append(row)
            else:
                torch.testing.assert_close(embeds, prompt)
        return dropped

    drawn = {salt: dropped_rows(range(8), salt) for salt in range(6)}
    assert 0.3 < sum(map(len, drawn.values())) / 48 < 0.7
    assert len({tuple(rows) for rows in drawn.values()}) > 1  # drawn afresh each step
    assert dropped_rows(range(8), salt=-1) == []  # evaluation keeps every prompt
    # The draw belongs to the row and the step, not to the batch it lands in (nor to a resume).
    for salt, rows in drawn.items():
        assert dropped_rows([5], salt) == ([5] if 5 in rows else [])


def test_v_prediction_target_is_the_velocity(tmp_path, tiny_sd_v_path):
    trainer = PolyDPOTrainer(tiny_sd_v_path, config(tmp_path), pickapic_dataset(4), peft_config=lora())
    family = trainer.family
    latents, noise, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([100, 900])
    _, target = family.noisy_input_and_target(latents, noise, t)
    a = family.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(target, a.sqrt() * noise - (1 - a).sqrt() * latents)
    trainer.train()
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_eight_bit_adamw(tmp_path, tiny_sd_path):
    trainer = PolyDPOTrainer(
        tiny_sd_path, config(tmp_path, optim="adamw_bnb_8bit", loss_type="sft"), pickapic_dataset(8)
    )
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(optimizer).__module__.startswith("bitsandbytes.optim")
    state_dtypes = {t.dtype for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)}
    assert torch.uint8 in state_dtypes  # 8-bit moments for the larger tensors
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_gradient_checkpointing_gives_the_same_lora_gradients(tmp_path, tiny_sd_path):
    """Checkpointing recomputes activations; the LoRA gradients must be those of a run without it (the classic bug:
    checkpointed blocks whose inputs need no grad leave the LoRA weights inside them with zero gradient)."""

    def lora_grads(checkpointing):
        args = config(tmp_path, gradient_checkpointing=checkpointing)
        trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(4), peft_config=lora())
        assert trainer.model.is_gradient_checkpointing == checkpointing
        trainer.model.train()
        trainer.compute_loss(trainer.model, one_batch(trainer)).backward()
        lora_params = [(n, p) for n, p in trainer.model.named_parameters() if "lora" in n]
        return trainer, {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in lora_params}

    _, plain = lora_grads(False)
    trainer, checkpointed = lora_grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    # B starts at zero, so at step 0 only the B matrices have a gradient; every one of them must.
    assert all(g.abs().sum() > 0 for n, g in plain.items() if "lora_B" in n)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-7, msg=name)
    # The saved config says what ran: checkpointing on (the trainer no longer switches the field off).
    trainer.args.max_steps = 1
    trainer.train()
    trainer.save_model()
    saved = json.loads((tmp_path / "out" / "poly_dpo_config.json").read_text())
    assert saved["gradient_checkpointing"] is True and saved["activation_checkpointing"] is True
    assert saved["beta"] is None and saved["beta_resolved"] == 2000.0


@pytest.mark.parametrize("lora_on", [True, False], ids=["lora", "full"])
def test_torch_compile_compiles_the_reference_forward_as_well_as_the_policys(tmp_path, tiny_sd_path, lora_on):
    """accelerate compiles the model it prepares (the policy); the reference forward must run compiled too: through
    the policy's compiled module with LoRA, as its own compiled copy when fully fine-tuning. A hook inside each
    network records whether it runs under torch.compile, and with gradients (policy) or without (reference)."""
    torch._dynamo.reset()
    args = config(tmp_path, torch_compile=True, torch_compile_backend="eager")  # "eager": traced, not code-generated
    trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(4), peft_config=lora() if lora_on else None)
    calls = []
    references = [trainer.ref_denoiser] if trainer.ref_denoiser is not None else []
    for network in [trainer.model, *references]:
        network = getattr(network, "_orig_mod", network)  # a compiled module's network
        network.conv_in.register_forward_pre_hook(
            lambda *_: calls.append((torch.compiler.is_compiling(), torch.is_grad_enabled()))
        )
    trainer.train()
    assert sorted(set(calls)) == [(True, False), (True, True)]  # the reference's forwards and the policy's
    assert len(calls) == 4  # 2 steps x (reference + policy)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)


def test_predict_and_compute_metrics_give_each_pairs_implicit_rewards_and_its_row(tmp_path, tiny_sd_path):
    """`trainer.predict` as TRL users know it: per pair [reward_chosen, reward_rejected] under evaluation's fixed
    noise, the dataset row as label (a tie, which training skips, has none), and the metrics `evaluate` reports,
    under `test_`, taken so none leaks into the next evaluation."""
    args = config(tmp_path, max_steps=2, learning_rate=5e-2, poly_alpha=2.0)
    trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(4), peft_config=lora())
    trainer.train()
    test = pickapic_dataset(4, ties=1)
    out = trainer.predict(test)
    assert out.predictions.shape == (4, 2) and out.label_ids.tolist() == [0, 1, 2, 3]

    trainer.model.eval()
    batch = trainer._prepare_inputs(next(iter(trainer.get_test_dataloader(trainer._prepare_dataset(test, args)))))
    with torch.no_grad():
        chosen, rejected = implicit_rewards(trainer.denoising_errors(trainer.model, batch, salt=-1), trainer.beta)
    np.testing.assert_allclose(out.predictions, torch.stack([chosen, rejected], 1).numpy(), rtol=1e-5)

    p = 1 / (1 + np.exp(-(out.predictions[:, 0] - out.predictions[:, 1])))  # (one batch of 4)
    assert out.metrics["test_loss"] == pytest.approx(np.mean(-np.log(p) + 2.0 * (1 - p)), rel=1e-4)
    assert out.metrics["test_rewards/accuracies"] == pytest.approx(np.mean(p > 0.5))
    assert not trainer._metrics["eval"]
    again = trainer.evaluate(test)
    assert again["eval_rewards/margins"] == pytest.approx(out.metrics["test_rewards/margins"], rel=1e-5)

    # compute_metrics, as trl.DPOTrainer takes it, sees the same per-pair predictions
    seen = []

    def median_margin(prediction):
        seen.append((prediction.predictions, prediction.label_ids))
        return {"median_margin": float(np.median(prediction.predictions[:, 0] - prediction.predictions[:, 1]))}

    with_metrics = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(4), peft_config=lora(),
                                  compute_metrics=median_margin)  # fmt: skip
    with_metrics.model.load_state_dict(trainer.model.state_dict())
    metrics = with_metrics.evaluate(test)
    np.testing.assert_allclose(seen[0][0], out.predictions, rtol=1e-5)
    assert seen[0][1].tolist() == [0, 1, 2, 3]
    assert metrics["eval_median_margin"] == pytest.approx(np.median(out.predictions[:, 0] - out.predictions[:, 1]))


def test_evaluation_reports_prefixed_metrics(tmp_path, tiny_sd_path):
    trainer = PolyDPOTrainer(
        tiny_sd_path, config(tmp_path), pickapic_dataset(4), eval_dataset=pickapic_dataset(4), peft_config=lora()
    )
    first = trainer.evaluate()
    second = trainer.evaluate()
    assert "eval_rewards/accuracies" in first and "eval_loss" in first
    assert first["eval_loss"] == pytest.approx(second["eval_loss"])  # fixed noise per pair in evaluation


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted_run(tmp_path, tiny_sd_path):
    def run(out, resume=None):
        args = config(
            tmp_path,
            output_dir=str(out),
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            center_crop=False,
            random_flip=True,
            poly_alpha=0.5,
            proportion_empty_prompts=0.5,  # its draw must be a resume's too
        )
        recorder = StepRecorder()
        trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(6), peft_config=lora(), callbacks=[recorder])
        trainer.train(resume_from_checkpoint=resume)
        lora_state = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" in k}
        losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
        return lora_state, losses, recorder.steps

    full_state, full_losses, full_steps = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "pytorch_lora_weights.safetensors").is_file()
    resumed_state, resumed_losses, resumed_steps = run(tmp_path / "resumed", resume=str(checkpoint))
    assert full_steps == [1, 2, 3, 4] and resumed_steps == [3, 4]  # resumed, not restarted
    for k in full_state:
        torch.testing.assert_close(resumed_state[k], full_state[k])
    assert resumed_losses[3] == pytest.approx(full_losses[3]) and resumed_losses[4] == pytest.approx(full_losses[4])


@pytest.mark.parametrize(
    "changed, expected",
    [
        (
            {"use_dora": True},
            "LoRA tensors it lacks ['down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_magn",
        ),
        ({"target_modules": ["to_q"]}, "unexpected keys"),
    ],
)
def test_a_resume_with_another_lora_is_refused(tmp_path, tiny_sd_path, changed, expected):
    """A checkpoint loads only into the LoRA it was saved from: a resume that adds DoRA would otherwise start the
    magnitudes afresh without a word."""
    first = PolyDPOTrainer(tiny_sd_path, config(tmp_path, max_steps=1, save_strategy="steps", save_steps=1),
                           pickapic_dataset(4), peft_config=lora())  # fmt: skip
    first.train()
    other = LoraConfig(**{**lora().to_dict(), **changed})
    again = PolyDPOTrainer(tiny_sd_path, config(tmp_path, max_steps=2), pickapic_dataset(4), peft_config=other)
    with pytest.raises(ValueError, match=re.escape(expected)):
        again.train(resume_from_checkpoint=True)


def test_training_a_finished_run_longer_follows_the_new_schedule_from_its_first_step(tmp_path, tiny_sd_path):
    """Resuming a finished 4-step run (linear decay, which ends at lr 0) with max_steps=6: step 5 trains at the
    6-step plan's rate, not at the 0 the old plan ended with (transformers restores the optimizer's last rate)."""
    from safetensors.torch import load_file

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def run(max_steps, resume=None):
        args = config(tmp_path, max_steps=max_steps, lr_scheduler_type="linear", save_strategy="steps", save_steps=2)
        trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(6), peft_config=lora(), callbacks=[Snapshot()])
        trainer.train(resume_from_checkpoint=resume)
        return {h["step"]: h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h}

    snapshots = {}
    assert run(4) == pytest.approx({1: 1e-3, 2: 7.5e-4, 3: 5e-4, 4: 2.5e-4})
    extended = run(6, resume=str(tmp_path / "out" / "checkpoint-4"))
    assert extended[5] == pytest.approx(1e-3 * 2 / 6) and extended[6] == pytest.approx(1e-3 / 6)
    saved = load_file(tmp_path / "out" / "checkpoint-4" / "pytorch_lora_weights.safetensors")
    lora_keys = [k for k in snapshots[5] if "lora_" in k]
    assert len(saved) == len(lora_keys) > 0
    # step 5 moved the LoRA (at lr 0 Adam would leave every weight where checkpoint-4 has it)
    assert any(not torch.equal(snapshots[5][k], snapshots[4][k]) for k in lora_keys)


@pytest.mark.slow
def test_resumed_full_finetune_matches(tmp_path, tiny_sd_path):
    recorder = StepRecorder()

    def run(out, resume=None):
        args = config(tmp_path, output_dir=str(out), max_steps=4, save_strategy="steps", save_steps=2)
        trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(6), callbacks=[recorder])
        recorder.steps.clear()
        trainer.train(resume_from_checkpoint=resume)
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    assert recorder.steps == [3, 4]  # resumed, not restarted
    for k in full:
        torch.testing.assert_close(resumed[k], full[k])


def test_gradient_accumulation_equals_one_batch_of_the_same_pairs(tmp_path, tiny_sd_path):
    def run(batch_size, accumulation):
        args = config(
            tmp_path, output_dir=str(tmp_path / f"ga{accumulation}"), per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, max_steps=2, learning_rate=1e-2, poly_alpha=2.0,
            optim="sgd", max_grad_norm=0.0,  # an update proportional to the gradient: no clipping, no Adam scaling
        )  # fmt: skip
        trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(8), peft_config=lora())
        trainer.train()
        losses = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]
        return {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" in k}, losses

    whole, whole_losses = run(batch_size=4, accumulation=1)
    accumulated, accumulated_losses = run(batch_size=2, accumulation=2)
    # the same pairs, noise and mean loss per optimizer step: the same loss, gradient and update (float sums aside)
    assert np.allclose(accumulated_losses, whole_losses, rtol=1e-4)
    for k in whole:
        torch.testing.assert_close(accumulated[k], whole[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lora_on", [True, False], ids=["lora", "full"])
def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path, tiny_sd_path, lora_on):
    class PickStepTwo(TrainerCallback):
        """A metric whose best is the first evaluation, so the best checkpoint is not the last state."""

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            metrics["eval_pick"] = 1.0 if state.global_step == 2 else 0.0

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    snapshots = {}
    args = config(
        tmp_path, max_steps=4, learning_rate=5e-2, save_strategy="steps", save_steps=2, eval_strategy="steps",
        eval_steps=2, load_best_model_at_end=True, metric_for_best_model="pick", greater_is_better=True,
    )  # fmt: skip
    trainer = PolyDPOTrainer(
        tiny_sd_path, args, pickapic_dataset(8), eval_dataset=pickapic_dataset(4),
        peft_config=lora() if lora_on else None, callbacks=[PickStepTwo(), Snapshot()],
    )  # fmt: skip
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    final = trainer.model.state_dict()
    trained = [k for k in final if "lora_" in k] if lora_on else list(final)
    assert any(not torch.equal(snapshots[2][k], snapshots[4][k]) for k in trained)  # the two states differ
    for k in trained:
        torch.testing.assert_close(final[k], snapshots[2][k], rtol=0, atol=0)


# ---------------------------------------------------------------- bad input


def test_lora_target_matching_no_module(tmp_path, tiny_sd_path):
    bad = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"target_modules=.*matches no module of UNet2DConditionModel.*to_q"):
        PolyDPOTrainer(tiny_sd_path, config(tmp_path), pickapic_dataset(4), peft_config=bad)


@pytest.mark.parametrize(
    "embedded, resolution, warned, effect",
    [(False, 16, False, None), (False, 32, False, None), (False, 8, False, None), (False, 64, True, "upscaled"),
     (True, 8, True, "does not generate at")],
)  # fmt: skip
def test_a_resolution_far_from_the_models_native_size_is_warned(
    tmp_path, tiny_sd_path, caplog, embedded, resolution, warned, effect
):
    """Native size = the UNet's sample_size x the VAE's downsampling: 8 x 2 = 16 px for the tiny test model, 16 x 2 =
    32 px for the embedded one; within 2x of it passes quietly."""
    from vipo_trl.default import MODEL_DIR

    model, native = (str(MODEL_DIR), 32) if embedded else (tiny_sd_path, 16)
    with caplog.at_level("WARNING", logger="vipo_trl"):
        trainer = PolyDPOTrainer(model, args=config(tmp_path, resolution=resolution), train_dataset=pickapic_dataset(4))
    assert trainer.family.native_resolution == native
    messages = [r.getMessage() for r in caplog.records if "built for" in r.getMessage()]
    assert bool(messages) == warned
    if warned:
        assert f"resolution={resolution}" in messages[0] and f"Set resolution={native}" in messages[0]
        assert effect in messages[0]


def test_unsupported_family(tmp_path, tiny_sd_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="Unsupported model family.*KandinskyPipeline.*StableDiffusionPipeline"):
        PolyDPOTrainer(str(folder), config(tmp_path), pickapic_dataset(4))
    with pytest.raises(ValueError, match="Cannot read model_index.json"):
        PolyDPOTrainer(str(tmp_path / "nowhere"), config(tmp_path), pickapic_dataset(4))


def test_streaming_dataset_trains_and_counts_skipped_ties(tmp_path, tiny_sd_path):
    stream = pickapic_dataset(6, ties=2).select([0, 6, 1, 7, 2, 3, 4, 5]).to_iterable_dataset()
    args = config(tmp_path, max_steps=4, logging_steps=4)
    trainer = PolyDPOTrainer(tiny_sd_path, args, stream, peft_config=lora())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" in k}
    trainer.train()
    logged = trainer.state.log_history[0]
    assert np.isfinite(logged["loss"]) and logged["data/skipped/tie"] >= 2
    assert any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())


class PoisonStep(__import__("transformers").TrainerCallback):
    """Make the loss of the given steps NaN by poisoning one LoRA weight before them and restoring it after."""

    def __init__(self, trainer, steps):
        self.trainer, self.steps, self.saved = trainer, set(steps), None

    def _param(self):
        return next(p for n, p in self.trainer.model.named_parameters() if "lora_B" in n)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            self.saved = self._param().detach().clone()
            with torch.no_grad():
                self._param().fill_(float("nan"))

    def on_step_end(self, args, state, control, **kwargs):
        if self.saved is not None:
            with torch.no_grad():
                self._param().copy_(self.saved)
            self.saved = None


def test_a_nan_step_is_skipped_counted_and_logged(tmp_path, tiny_sd_path):
    args = config(tmp_path, max_steps=4, logging_steps=4)
    trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(8), peft_config=lora())
    trainer.add_callback(PoisonStep(trainer, steps=[1]))
    trainer.train()
    assert trainer.nonfinite_steps == 1
    assert trainer.state.log_history[0]["nonfinite/skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the NaN step left no trace


def test_too_many_nan_steps_stop_with_a_clear_message(tmp_path, tiny_sd_path):
    args = config(tmp_path, max_steps=4, max_nonfinite_steps=1)
    trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(8), peft_config=lora())
    trainer.add_callback(PoisonStep(trainer, steps=[0, 1, 2]))
    with pytest.raises(FloatingPointError, match=r"2 optimizer steps had a non-finite.*max_nonfinite_steps=1.*rows"):
        trainer.train()


def test_bf16_mixed_precision_lora_keeps_trainable_weights_in_float32(tmp_path, tiny_sd_path):
    trainer = PolyDPOTrainer(
        tiny_sd_path, config(tmp_path, bf16=True, poly_alpha=0.5), pickapic_dataset(4), peft_config=lora()
    )
    trainable = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}
    assert trainer.family.pipeline.text_encoder.dtype == torch.bfloat16
    assert trainer.family.vae.dtype == torch.bfloat16  # bf16 has float32's range: no float32 VAE needed
    trainer.train()
    assert all(np.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_float16_keeps_the_vae_in_float32(tmp_path, tiny_sd_path):
    """The SD VAEs overflow in float16: under it the VAE alone stays in float32."""
    trainer = PolyDPOTrainer(
        tiny_sd_path, config(tmp_path, torch_dtype="float16"), pickapic_dataset(4), peft_config=lora()
    )
    assert trainer.family.vae.dtype == torch.float32
    assert trainer.family.pipeline.text_encoder.dtype == torch.float16


def test_per_category_metrics_and_balanced_sampling(tmp_path, tiny_sd_path):
    data = pickapic_dataset(8)
    data = data.add_column("category", ["aesthetics"] * 6 + ["portrait"] * 2)
    args = config(tmp_path, category_column="category", category_balanced=True, max_steps=4, logging_steps=4)
    trainer = PolyDPOTrainer(tiny_sd_path, args, data, peft_config=lora())
    assert trainer.categories == ["aesthetics", "portrait"]
    assert type(trainer._get_train_sampler()).__name__ == "CategoryBalancedSampler"
    trainer.train()
    logged = trainer.state.log_history[0]
    for name in ("aesthetics", "portrait"):
        for metric in ("loss", "rewards/accuracies", "rewards/margins"):
            assert np.isfinite(logged[f"category/{name}/{metric}"])
    with pytest.raises(ValueError, match="category_balanced.*needs category_column"):
        config(tmp_path, category_balanced=True)


def test_category_metric_is_the_loss_on_that_category(tmp_path, tiny_sd_path):
    data = pickapic_dataset(4).add_column("category", ["a", "b", "a", "b"])
    trainer = PolyDPOTrainer(tiny_sd_path, config(tmp_path, category_column="category"), data, peft_config=lora())
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    errors = trainer.denoising_errors(trainer.model, batch, salt=0)
    only_a = type(errors)(*(t[[0, 2]] for t in vars(errors).values()))
    expected = trainer.preference_loss(only_a)[0].item()
    sums = trainer._category_sums["train"]
    assert (sums[0, 0, 0] / sums[1, 0, 0]).item() == pytest.approx(expected, rel=1e-5)


def test_a_save_that_fails_halfway_leaves_the_previous_save_whole(tmp_path, tiny_sd_path):
    from safetensors.torch import load_file

    trainer = PolyDPOTrainer(tiny_sd_path, config(tmp_path, max_steps=1), pickapic_dataset(4), peft_config=lora())
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    weights = out / "pytorch_lora_weights.safetensors"
    before = load_file(weights)

    def dying_save_lora(folder, denoiser, state_dict=None):  # a crash in the middle of writing the weights file
        with open(os.path.join(folder, "pytorch_lora_weights.safetensors"), "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    trainer.family.save_lora = dying_save_lora
    with pytest.raises(KeyboardInterrupt):
        trainer.save_model()
    after = load_file(weights)  # still the previous save, whole
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not [p for p in os.listdir(out) if p.startswith(".saving-")]  # no scratch folder left behind


def test_every_checkpoint_refreshes_the_model_card(tmp_path, tiny_sd_path):
    from transformers import TrainerCallback

    seen = []

    class ReadCard(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            seen.append((state.global_step, (tmp_path / "out" / "README.md").read_text()))

    args = config(tmp_path, save_strategy="steps", save_steps=1, max_steps=2)
    trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(4), peft_config=lora(), callbacks=[ReadCard()])
    trainer.train()
    assert [step for step, _ in seen] == [1, 2]
    for step, card in seen:
        assert f"| steps | {step} |" in card and "| beta (resolved) | 2000.0 |" in card


def test_validation_prompts_make_comparable_images_during_training(tmp_path, tiny_sd_path):
    import numpy as np
    from PIL import Image

    args = config(
        tmp_path, validation_prompts=["a red square", "a blue square"], validation_steps=2, max_steps=3,
        learning_rate=5e-2,
    )  # fmt: skip
    trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(8), peft_config=lora())
    trainer.train()
    folder = tmp_path / "out" / "validation"
    assert sorted(p.name for p in folder.iterdir()) == ["step-0.png", "step-2.png", "step-3.png"]
    first, last = (np.asarray(Image.open(folder / n), dtype=np.int16) for n in ("step-0.png", "step-3.png"))
    assert first.shape == last.shape == (16, 32, 3)  # one 16-px image per prompt, side by side
    assert np.abs(first - last).mean() > 1  # the LoRA changed what the model draws for the same seed


def test_a_datasetdict_missing_columns_or_an_endless_stream_are_refused_before_the_model_loads(
    tmp_path, tiny_sd_path, monkeypatch
):
    from datasets import DatasetDict

    import vipo_trl.trainer.poly_dpo_trainer as trainer_module
    from vipo_trl.data import PreferenceDataError

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the dataset's columns were checked")

    monkeypatch.setattr(trainer_module, "load_family", refuse)
    data = pickapic_dataset(4)
    with pytest.raises(PreferenceDataError, match=r"train_dataset is a DatasetDict.*train_dataset=dataset\['train'\]"):
        PolyDPOTrainer(tiny_sd_path, config(tmp_path), DatasetDict(train=data))
    with pytest.raises(PreferenceDataError, match=r"train_dataset: .*lacks column\(s\) \['label_1'\]"):
        PolyDPOTrainer(tiny_sd_path, config(tmp_path), data.remove_columns("label_1"))
    with pytest.raises(PreferenceDataError, match=r"eval_dataset\['held_out'\]: .*lacks column\(s\) \['caption'\]"):
        PolyDPOTrainer(tiny_sd_path, config(tmp_path), data, eval_dataset={"held_out": data.remove_columns("caption")})
    with pytest.raises(ValueError, match=r"train_dataset is a stream .* set max_steps"):
        PolyDPOTrainer(tiny_sd_path, config(tmp_path, max_steps=-1), data.to_iterable_dataset())
    # A DatasetDict as eval_dataset is several named evaluation sets, as in transformers' Trainer: accepted.
    monkeypatch.undo()
    trainer = PolyDPOTrainer(tiny_sd_path, config(tmp_path), data, eval_dataset=DatasetDict(a=data, b=data))
    assert set(trainer.eval_dataset) == {"a", "b"}


def test_start_from_an_earlier_run_trains_on_top_of_it_and_the_card_rebuilds_the_result(tmp_path, tiny_sd_path):
    """SFT, then Poly-DPO: the second stage starts from the SFT run's LoRA fused into the base (policy = reference =
    that model at step 0), and the model card's loading code rebuilds exactly the trained model."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    sft = PolyDPOTrainer(
        tiny_sd_path, config(tmp_path, output_dir=str(tmp_path / "sft"), loss_type=["sft"], learning_rate=5e-2),
        pickapic_dataset(8), peft_config=lora(),
    )  # fmt: skip
    sft.train()
    sft.save_model()
    dpo = PolyDPOTrainer(
        tiny_sd_path, config(tmp_path, output_dir=str(tmp_path / "dpo"), learning_rate=5e-2), pickapic_dataset(8),
        peft_config=lora(), start_from=str(tmp_path / "sft"),
    )  # fmt: skip

    batch = one_batch(dpo)
    latents = dpo.family.encode_images(batch["pixel_values_chosen"], dpo._pair_generators(batch["row_index"], 0))
    cond, t = dpo.family.encode_conditioning(batch), torch.tensor([10, 500])

    def prediction(unet):
        with torch.no_grad():
            return unet(latents, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    fused = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    fused.load_lora_weights(str(tmp_path / "sft"))
    sft_model = prediction(fused.unet)
    with torch.no_grad():
        reference = dpo._reference_prediction(dpo.model, latents, t, cond)
    torch.testing.assert_close(reference, sft_model, rtol=1e-4, atol=1e-5)  # the reference is the SFT model
    with torch.no_grad():
        policy = dpo.family.predict(dpo.model, latents, t, cond, torch.float32)
    torch.testing.assert_close(policy, reference, rtol=1e-4, atol=1e-4)  # the policy starts there (gaussian A, B=0)
    base = prediction(UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet"))
    assert (sft_model - base).abs().max() > 1e-3  # the SFT stage moved the model: starting from it matters

    dpo.train()
    dpo.save_model()
    dpo.create_model_card()
    trained = prediction(dpo.model)
    card = (tmp_path / "dpo" / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0].replace("torch.bfloat16", "torch.float32")
    assert f'pipe.load_lora_weights("{tmp_path / "sft"}"); pipe.fuse_lora(); pipe.unload_lora_weights()' in snippet
    scope = {}
    exec(snippet.replace('"dpo"', f'"{tmp_path / "dpo"}"'), scope)  # the card's code, as a user runs it
    torch.testing.assert_close(prediction(scope["pipe"].unet), trained, rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "dpo" / "vipo_trl_model.json").read_text())["started_from"] == [
        [str(tmp_path / "sft"), "lora"]
    ]


def test_start_from_a_full_fine_tune_puts_its_denoiser_in_place(tmp_path, tiny_sd_path):
    from diffusers import UNet2DConditionModel

    full = PolyDPOTrainer(
        tiny_sd_path, config(tmp_path, output_dir=str(tmp_path / "full"), max_steps=1), pickapic_dataset(4)
    )
    full.train()
    full.save_model()
    second = PolyDPOTrainer(
        tiny_sd_path, config(tmp_path, output_dir=str(tmp_path / "next")), pickapic_dataset(4), peft_config=lora(),
        start_from=[str(tmp_path / "full")],
    )  # fmt: skip
    tuned = UNet2DConditionModel.from_pretrained(str(tmp_path / "full"))
    base = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    latents, t, states = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 8, 16)
    with torch.no_grad():
        reference = second._reference_prediction(second.model, latents, t, {"encoder_hidden_states": states})
        expected = tuned(latents, t, encoder_hidden_states=states).sample
        plain = base(latents, t, encoder_hidden_states=states).sample
    torch.testing.assert_close(reference, expected, rtol=1e-4, atol=1e-5)
    assert (expected - plain).abs().max() > 1e-4
    assert second.family.fused_runs == [(str(tmp_path / "full"), "denoiser")]
    # The card's code puts the fine-tuned denoiser in place, then loads this run's LoRA: the trained model.
    second.train()
    second.save_model()
    second.create_model_card()
    card = (tmp_path / "next" / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0].replace("torch.bfloat16", "torch.float32")
    scope = {}
    exec(snippet.replace('"next"', f'"{tmp_path / "next"}"'), scope)
    with torch.no_grad():
        rebuilt = scope["pipe"].unet(latents, t, encoder_hidden_states=states).sample
        trained = second.model(latents, t, encoder_hidden_states=states).sample
    torch.testing.assert_close(rebuilt, trained, rtol=1e-4, atol=1e-4)


def test_a_chain_of_runs_is_recorded_whole_and_loaded_as_it_was_trained(tmp_path, tiny_sd_path):
    """Run 2 starts from run 1, which started from run 0: run 2 records both, and loading it for sampling (`vipo-trl
    eval --lora`, `pairs --lora`) fuses both before its LoRA; swapped in and out, the base is back as it was."""
    from diffusers import StableDiffusionPipeline

    from vipo_trl.models.generation import load_aligned_weights, started_from, swap_in_aligned_weights

    runs = [tmp_path / f"run{i}" for i in range(3)]
    for i, out in enumerate(runs):
        trainer = PolyDPOTrainer(
            tiny_sd_path, config(tmp_path, output_dir=str(out), max_steps=1, learning_rate=5e-2, seed=i),
            pickapic_dataset(4), peft_config=lora(), start_from=str(runs[i - 1]) if i else None,
        )  # fmt: skip
        trainer.train()
        trainer.save_model()
    assert started_from(str(runs[2])) == [(str(runs[0]), "lora"), (str(runs[1]), "lora")]

    latents, t, states = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 8, 16)

    def prediction(unet):
        with torch.no_grad():
            return unet(latents, t, encoder_hidden_states=states).sample

    trained = prediction(trainer.model)
    loaded = load_aligned_weights(StableDiffusionPipeline.from_pretrained(tiny_sd_path), str(runs[2]))
    torch.testing.assert_close(prediction(loaded.unet), trained, rtol=1e-4, atol=1e-4)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    base = prediction(pipe.unet)
    take_out = swap_in_aligned_weights(pipe, str(runs[2]))
    torch.testing.assert_close(prediction(pipe.unet), trained, rtol=1e-4, atol=1e-4)
    take_out()
    torch.testing.assert_close(prediction(pipe.unet), base, rtol=0, atol=0)


def test_a_run_loaded_from_the_hub_brings_the_runs_it_started_from(tmp_path, tiny_sd_path, monkeypatch):
    """SFT, then Poly-DPO from it, both pushed: `vipo-trl eval --lora you/stage2` (and `--start_from`) fuse stage 1
    from the Hub before stage 2's LoRA, as trained, with stage 1's folder gone; a repo whose chain names a folder
    that was never pushed is refused rather than loaded alone."""
    import json
    import shutil

    import huggingface_hub
    from diffusers import StableDiffusionPipeline

    from vipo_trl.models.generation import fusion_chain, load_aligned_weights, started_from

    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    trained_and_saved(tiny_sd_path, config(tmp_path, output_dir=str(stage1), max_steps=1, learning_rate=5e-2),
                      pickapic_dataset(4), peft_config=lora())  # fmt: skip
    described = json.loads((stage1 / "vipo_trl_model.json").read_text())
    (stage1 / "vipo_trl_model.json").write_text(json.dumps({**described, "hub_model_id": "you/stage1"}))  # pushed
    second = PolyDPOTrainer(
        tiny_sd_path, config(tmp_path, output_dir=str(stage2), max_steps=1, learning_rate=5e-2, seed=1),
        pickapic_dataset(4), peft_config=lora(), start_from=str(stage1),
    )  # fmt: skip
    second.train()
    second.save_model()
    recorded = json.loads((stage2 / "vipo_trl_model.json").read_text())
    assert recorded["started_from_published"] == [["you/stage1", "lora"]]

    cache = tmp_path / "hub-cache"
    hub_cache_repo(cache, "you/stage1", stage1)
    hub_cache_repo(cache, "you/stage2", stage2)
    (stage2 / "vipo_trl_model.json").write_text(
        json.dumps({**recorded, "started_from_published": [[str(stage1), "lora"]]})
    )
    hub_cache_repo(cache, "you/unpushed-start", stage2)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    shutil.rmtree(stage1)  # not on this machine: only its Hub repo

    assert started_from("you/stage2") == [("you/stage1", "lora")]
    assert fusion_chain(["you/stage2"]) == [("you/stage1", "lora"), ("you/stage2", "lora")]
    latents, t, states = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 8, 16)

    def prediction(unet):
        with torch.no_grad():
            return unet(latents, t, encoder_hidden_states=states).sample

    trained = prediction(second.model)
    loaded = load_aligned_weights(StableDiffusionPipeline.from_pretrained(tiny_sd_path), "you/stage2")
    torch.testing.assert_close(prediction(loaded.unet), trained, rtol=1e-4, atol=1e-4)
    alone = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    alone.load_lora_weights("you/stage2", weight_name="pytorch_lora_weights.safetensors")
    assert (prediction(alone.unet) - trained).abs().max() > 1e-3  # stage 2's LoRA alone is another model
    with pytest.raises(
        ValueError, match=r"you/unpushed-start was trained on top of .*stage1, a folder .* never pushed"
    ):
        started_from("you/unpushed-start")
    # Round 3 against stage 2 from the Hub, starting from stage 1 from the Hub: the bases agree by their repo names
    third = PolyDPOTrainer(tiny_sd_path, config(tmp_path), pickapic_dataset(4), peft_config=lora(),
                           start_from="you/stage1", ref_model="you/stage2")  # fmt: skip
    with torch.no_grad():
        reference = third._reference_prediction(third.model, latents, t, {"encoder_hidden_states": states})
    torch.testing.assert_close(reference, trained, rtol=1e-4, atol=1e-4)


def test_a_lora_reference_must_share_the_base_it_was_trained_on(tmp_path, tiny_sd_path):
    """Round 1 started from an SFT stage: as `ref_model` on the bare base it would be a model nobody trained (refused,
    LoRA and full fine-tuning alike); with the same `start_from` it is round 1's model exactly."""
    sft, round1 = tmp_path / "sft", tmp_path / "round1"
    for out, start in ((sft, None), (round1, str(sft))):
        trainer = PolyDPOTrainer(
            tiny_sd_path, config(tmp_path, output_dir=str(out), max_steps=1, learning_rate=5e-2),
            pickapic_dataset(4), peft_config=lora(), start_from=start,
        )  # fmt: skip
        trainer.train()
        trainer.save_model()
    message = r"ref_model=.*round1: that LoRA was trained on top of .*sft, but this run's base is the base model alone"
    for peft_config in (lora(), None):
        with pytest.raises(ValueError, match=message):
            PolyDPOTrainer(tiny_sd_path, config(tmp_path), pickapic_dataset(4), peft_config=peft_config,
                           ref_model=str(round1))  # fmt: skip
    both = PolyDPOTrainer(tiny_sd_path, config(tmp_path), pickapic_dataset(4), peft_config=lora(),
                          start_from=str(sft), ref_model=str(round1))  # fmt: skip
    latents, t, states = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 8, 16)
    with torch.no_grad():
        reference = both._reference_prediction(both.model, latents, t, {"encoder_hidden_states": states})
        trained = trainer.model(latents, t, encoder_hidden_states=states).sample
    torch.testing.assert_close(reference, trained, rtol=1e-4, atol=1e-4)


def test_a_hub_run_that_does_not_exist_is_named_in_one_line(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from vipo_trl.models.generation import started_from

    def not_found(repo_id, filename, **kwargs):
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # (its constructor wants an HTTP response)
        error.args = ("404 Client Error. Repository Not Found",)
        raise error

    with monkeypatch.context() as patched:
        patched.setattr(huggingface_hub, "hf_hub_download", not_found)
        with pytest.raises(ValueError, match=r"you/typo: no such folder here, and no such repo on the Hub"):
            started_from("you/typo")
    assert started_from("you/never-downloaded") == []  # offline, nothing cached: nothing recorded to read


@pytest.mark.parametrize("setting", ["start_from", "ref_model"])
def test_resuming_without_the_same_start_or_reference_is_refused(tmp_path, tiny_sd_path, setting):
    """A checkpoint records what it was trained on top of and against; resuming without it would train on."""
    first = PolyDPOTrainer(
        tiny_sd_path, config(tmp_path, output_dir=str(tmp_path / "first"), max_steps=1, learning_rate=5e-2),
        pickapic_dataset(4), peft_config=lora(),
    )  # fmt: skip
    first.train()
    first.save_model()
    earlier = {setting: str(tmp_path / "first")}
    args = config(tmp_path, output_dir=str(tmp_path / "second"), save_strategy="steps", save_steps=1, max_steps=1)
    PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(4), peft_config=lora(), **earlier).train()
    longer = config(tmp_path, output_dir=str(tmp_path / "second"), max_steps=2)
    checkpoint = str(tmp_path / "second" / "checkpoint-1")
    message = {
        "start_from": r"trained starting from \[.*first'\], but this run starts from the base model alone",
        "ref_model": r"trained against the reference .*first, but this run's reference is the model itself",
    }[setting]
    with pytest.raises(ValueError, match=message):
        PolyDPOTrainer(tiny_sd_path, longer, pickapic_dataset(4), peft_config=lora()).train(checkpoint)
    resumed = PolyDPOTrainer(tiny_sd_path, longer, pickapic_dataset(4), peft_config=lora(), **earlier)
    resumed.train(checkpoint)
    assert resumed.state.global_step == 2


@pytest.fixture(scope="module")
def two_format_lora(tiny_sd_path, tmp_path_factory):
    """A LoRA on every linear layer as builds before 2026-12-06 saved it: the attention projections in diffusers'
    older UNet keys (`lora.down`), the other layers in peft's (`lora_A`)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("two-formats")
    args = config(out, max_steps=1)
    all_linear = LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights="gaussian")
    trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(2), peft_config=all_linear)
    trainer.train()
    trainer.save_model()
    path = os.path.join(args.output_dir, "pytorch_lora_weights.safetensors")
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    save_file(convert_state_dict_to_diffusers(load_file(path)), path, metadata=metadata)
    return args.output_dir


def test_a_lora_saved_in_two_key_formats_is_refused_where_it_would_load_in_part(
    tmp_path, tiny_sd_path, two_format_lora, capsys, monkeypatch
):
    """`load_lora_weights` drops part of such a file with a warning: sampling (`eval --lora`), fusing (`start_from`)
    and a reference (`ref_model`) refuse it instead, the command line with one line before loading a model."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    from vipo_trl.cli import main
    from vipo_trl.models.generation import load_aligned_weights

    message = "mixes two key formats"
    data = str(tmp_path / "pairs.parquet")
    pickapic_dataset(2).to_parquet(data)
    with monkeypatch.context() as patch:
        patch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("a model loaded"))
        for flag in ("--ref_model", "--start_from"):
            argv = ["train", "--model_name_or_path", tiny_sd_path, "--dataset_name", data, flag, two_format_lora]
            with pytest.raises(SystemExit):
                main([*argv, "--output_dir", str(tmp_path / flag[2:]), "--use_peft", "--report_to", "none"])
            assert f"vipo-trl: error: {flag} {two_format_lora}: its LoRA {message}" in capsys.readouterr().err
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    with pytest.raises(ValueError, match=message):
        load_aligned_weights(pipe, two_format_lora)
    for setting in ("ref_model", "start_from"):
        with pytest.raises(ValueError, match=message):
            PolyDPOTrainer(tiny_sd_path, config(tmp_path), pickapic_dataset(2), peft_config=lora(),
                           **{setting: two_format_lora})  # fmt: skip
