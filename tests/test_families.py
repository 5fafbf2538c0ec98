"""Every supported family: a few Poly-DPO steps with LoRA and with full fine-tuning on a tiny pipeline saved with
save_pretrained and loaded by path; the LoRA loads into the family's official pipeline and changes its output."""

import numpy as np
import pytest
import torch
from families import FAMILIES, Family, assert_every_lora_b_moved, lora_b
from peft import LoraConfig

from vipo_trl import PolyDPOConfig, PolyDPOTrainer
from vipo_trl.models import StableDiffusion3Family, load_family
from vipo_trl.testing import pickapic_dataset

BY_NAME = {f.name: f for f in FAMILIES}


@pytest.fixture(scope="module")
def family_paths(tmp_path_factory):
    paths = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family.name)
        family.build().save_pretrained(path)
        paths[family.name] = str(path)
    return paths


def make_config(tmp_path, family: Family, **kw):
    args = dict(
        output_dir=str(tmp_path / "out"),
        resolution=family.resolution,
        per_device_train_batch_size=2,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        learning_rate=5e-2,
        use_cpu=True,
        disable_tqdm=True,
        beta=100.0,
        poly_alpha=0.5,
        seed=0,
        **family.config_overrides,
    )
    args.update(kw)
    return PolyDPOConfig(**args)


def generate(pipe, family: Family):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a red square",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **family.generate_kwargs,
    )
    return np.asarray(out.frames if hasattr(out, "frames") else out.images)


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_lora_steps_and_official_pipeline_load(tmp_path, family_paths, name):
    family = BY_NAME[name]
    path = family_paths[name]
    # lora_alpha = 2r: the saved scaling (2.0) must survive the round trip, not default to 1.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=family.lora_targets, init_lora_weights="gaussian")
    trainer = PolyDPOTrainer(path, make_config(tmp_path, family), family.dataset(4), peft_config=lora)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(np.isfinite(losses))
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], v) for k, v in after.items() if "lora_" not in k)
    assert any(not torch.equal(before[k], v) for k, v in after.items() if "lora_" in k)
    trainer.save_model()

    pipe = trainer.family.pipeline_class.from_pretrained(path)
    base = generate(pipe, family)
    pipe.load_lora_weights(trainer.args.output_dir)
    # Every trained LoRA weight arrives, under the same module, with the same value and scaling (diffusers only
    # warns about keys it cannot place, so a partial or mis-keyed load would otherwise pass).
    network = getattr(pipe, trainer.family.denoiser_name)
    (adapter,) = network.peft_config
    trained = {n.replace(".default.", "."): p for n, p in trainer.model.named_parameters() if "lora_" in n}
    loaded = {n.replace(f".{adapter}.", "."): p for n, p in network.named_parameters() if "lora_" in n}
    assert loaded.keys() == trained.keys() and len(trained) > 0
    if name == "sd35":  # its second self-attention is trained too
        assert any(".attn2." in key for key in trained)
    for key in trained:
        torch.testing.assert_close(loaded[key], trained[key].to(loaded[key].dtype), msg=key)
    scalings = {m.scaling[adapter] for m in network.modules() if adapter in getattr(m, "scaling", {})}
    assert scalings == {2.0}
    assert np.abs(generate(pipe, family) - base).max() > 1e-4


def lora_tensors(network, adapter="default"):
    """The network's LoRA tensors by name, without the adapter's name."""
    return {n.replace(f".{adapter}.", "."): p for n, p in network.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("name", ["sd", "sdxl", "flux"])
def test_a_lora_on_every_linear_layer_loads_whole_into_the_official_pipeline(tmp_path, family_paths, name):
    """`--lora_target_modules all-linear` (attention, feed-forward, projections, time embedding): every trained
    tensor loads. The UNets' older key format names only the attention projections; a file half in it lost them."""
    family = BY_NAME[name]
    lora = LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights="gaussian")
    trainer = PolyDPOTrainer(family_paths[name], make_config(tmp_path, family, max_steps=1), family.dataset(2),
                             peft_config=lora)  # fmt: skip
    trainer.train()
    trainer.save_model()
    trained = lora_tensors(trainer.model)
    assert any("to_q" in n for n in trained) and any(".ff." in n or "proj_mlp" in n for n in trained)

    pipe = trainer.family.pipeline_class.from_pretrained(family_paths[name])
    pipe.load_lora_weights(trainer.args.output_dir)
    network = getattr(pipe, trainer.family.denoiser_name)
    (adapter,) = network.peft_config
    loaded = lora_tensors(network, adapter)
    assert sorted(set(trained) - set(loaded)) == [] and loaded.keys() == trained.keys()
    for key in trained:
        torch.testing.assert_close(loaded[key], trained[key].to(loaded[key].dtype), msg=key)


LORA_VARIANTS = {
    "dora_rslora": {"use_dora": True, "use_rslora": True, "init_lora_weights": "gaussian"},
    "lora_bias": {"lora_bias": True},
}


@pytest.mark.parametrize("name, variant", [("sd", "dora_rslora"), ("flux", "dora_rslora"), ("flux", "lora_bias")])
def test_dora_rslora_and_lora_bias_load_into_the_official_pipeline_as_trained(tmp_path, family_paths, name, variant):
    """`--use_dora`, `--use_rslora` (TRL's flags) and peft's `lora_bias`: every trained tensor, DoRA's magnitudes and
    the LoRA biases included, reaches the pipeline with the same scaling (rsLoRA: alpha / sqrt(r)), through the
    UNet key conversion (sd) and the transformer families' peft keys (flux)."""
    family = BY_NAME[name]
    settings = LORA_VARIANTS[variant]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=family.lora_targets, **settings)
    trainer = PolyDPOTrainer(family_paths[name], make_config(tmp_path, family, max_steps=2), family.dataset(4),
                             peft_config=lora)  # fmt: skip
    before = {n: p.detach().clone() for n, p in lora_tensors(trainer.model).items()}
    trainer.train()
    trainer.save_model()
    trained = lora_tensors(trainer.model)
    extra = "lora_magnitude_vector" if settings.get("use_dora") else "lora_B.bias"
    assert [n for n, p in trained.items() if extra in n and not torch.equal(p, before[n])]  # the variant's own, trained

    pipe = trainer.family.pipeline_class.from_pretrained(family_paths[name])
    pipe.load_lora_weights(trainer.args.output_dir)
    network = getattr(pipe, trainer.family.denoiser_name)
    (adapter,) = network.peft_config
    loaded = lora_tensors(network, adapter)
    assert loaded.keys() == trained.keys()
    for key in trained:
        torch.testing.assert_close(loaded[key], trained[key].to(loaded[key].dtype), msg=key)
    scalings = {m.scaling[adapter] for m in network.modules() if adapter in getattr(m, "scaling", {})}
    assert scalings == ({8 / 4**0.5} if settings.get("use_rslora") else {2.0})
    assert network.peft_config[adapter].use_dora == bool(settings.get("use_dora"))


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_full_finetune_with_gradient_checkpointing(tmp_path, family_paths, name):
    family = BY_NAME[name]
    args = make_config(tmp_path, family, max_steps=2, learning_rate=1e-3, gradient_checkpointing=True)
    trainer = PolyDPOTrainer(family_paths[name], args, family.dataset(4))
    assert trainer.model.is_gradient_checkpointing
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert all(np.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_flow_matching_noising_and_target_by_hand(family_paths):
    family = load_family(family_paths["sd3"])
    assert isinstance(family, StableDiffusion3Family)
    generators = [torch.Generator().manual_seed(i) for i in range(64)]
    timesteps = family.sample_timesteps(generators)
    assert set(timesteps.tolist()) <= set(family.noise_scheduler.timesteps.tolist())
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = timesteps[:2]
    noisy, target = family.noisy_input_and_target(x0, noise, t)
    # FlowMatchEulerDiscreteScheduler: timestep = sigma * 1000 (shift already applied to both).
    sigma = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(target, noise - x0)
    assert family.error_weights(t) is None


def test_flow_timestep_density_and_loss_weighting(family_paths):
    from vipo_trl.models import DiffusionOptions

    generators = [torch.Generator().manual_seed(i) for i in range(400)]
    logit_normal = load_family(family_paths["sd3"]).sample_timesteps(generators).float()
    uniform = load_family(family_paths["sd3"], options=DiffusionOptions(timestep_sampling="uniform"))
    spread = uniform.sample_timesteps(generators).float()
    # Logit-normal concentrates on the middle of the schedule; uniform indices do not.
    middle = lambda t: ((t > 250) & (t < 950)).float().mean()  # noqa: E731
    assert middle(logit_normal) > middle(spread) + 0.1
    weighted = load_family(family_paths["sd3"], options=DiffusionOptions(loss_weighting="sigma_sqrt"))
    t = weighted.noise_scheduler.timesteps[[100, 500]]
    torch.testing.assert_close(weighted.error_weights(t), (t / 1000) ** -2.0)


def test_sdxl_time_ids_match_the_pipeline(tmp_path, family_paths):
    family = BY_NAME["sdxl"]
    trainer = PolyDPOTrainer(family_paths["sdxl"], make_config(tmp_path, family), pickapic_dataset(2))
    pipe = trainer.family.pipeline
    captured = {}

    def hook(module, args, kwargs):
        captured["time_ids"] = kwargs["added_cond_kwargs"]["time_ids"]

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    pipe.set_progress_bar_config(disable=True)
    pipe("a red square", num_inference_steps=1, height=16, width=16, output_type="latent")
    handle.remove()

    batch = {
        "prompts": ["a red square"],
        "pixel_values_chosen": torch.zeros(1, 3, 16, 16),
        "original_sizes": [(16, 16)],
        "crop_top_lefts": [(0, 0)],
    }
    ours = trainer.family.encode_conditioning(batch)["time_ids"]
    torch.testing.assert_close(ours[0], captured["time_ids"][-1].to(ours.dtype))
    # A cropped, larger original is conditioned on its own size and crop.
    batch.update(original_sizes=[(40, 30)], crop_top_lefts=[(5, 0)])
    assert trainer.family.encode_conditioning(batch)["time_ids"][0].tolist() == [40, 30, 5, 0, 16, 16]


def test_sd3_can_drop_t5(tmp_path, family_paths):
    family = BY_NAME["sd3"]
    args = make_config(tmp_path, family, drop_t5_text_encoder=True, max_steps=1)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=family.lora_targets)
    trainer = PolyDPOTrainer(family_paths["sd3"], args, pickapic_dataset(2), peft_config=lora)
    assert trainer.family.pipeline.text_encoder_3 is None
    assert "text_encoder_3" not in trainer.family.frozen_modules
    before = lora_b(trainer.model)
    trainer.train()
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert_every_lora_b_moved(trainer.model, before)


def test_flux_guidance_is_fed_to_a_guidance_distilled_transformer(tmp_path, family_paths):
    family = BY_NAME["flux"]
    trainer = PolyDPOTrainer(
        family_paths["flux"], make_config(tmp_path, family, guidance_scale=2.5), pickapic_dataset(2)
    )
    seen = []
    trainer.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["guidance"]), with_kwargs=True)
    trainer.train()
    assert seen and all(torch.all(g == 2.5) for g in seen)


def test_wan_refuses_still_images_clearly(tmp_path, family_paths):
    family = BY_NAME["wan"]
    trainer = PolyDPOTrainer(family_paths["wan"], make_config(tmp_path, family), pickapic_dataset(2))
    with pytest.raises(ValueError, match=r"Wan trains on videos \[B, 3, F, H, W\]"):
        trainer.train()


@pytest.mark.parametrize("name, beta", [("sd", 2000.0), ("sdxl", 5000.0), ("sd3", 100.0), ("flux", 100.0)])
def test_beta_defaults_to_the_family_recommendation(tmp_path, family_paths, name, beta):
    family = BY_NAME[name]
    args = make_config(tmp_path, family, beta=None)
    trainer = PolyDPOTrainer(family_paths[name], args, family.dataset(2))
    assert trainer.beta == beta and trainer.args.beta is None  # resolved on the trainer, the config left as given
    explicit = PolyDPOTrainer(family_paths[name], make_config(tmp_path, family, beta=42.0), family.dataset(2))
    assert explicit.beta == explicit.args.beta == 42.0


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_saved_lora_round_trips_into_a_fresh_trainer(tmp_path, family_paths, name):
    """What resume_from_checkpoint does with the model weights, and what start_from does (the LoRA fused into the
    base: the next run's reference is the trained model), for every family's LoRA key format."""
    family = BY_NAME[name]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=family.lora_targets, init_lora_weights="gaussian")
    trainer = PolyDPOTrainer(
        family_paths[name], make_config(tmp_path, family, max_steps=1), family.dataset(2), peft_config=lora
    )
    trainer.train()
    trainer.save_model()
    fresh = PolyDPOTrainer(
        family_paths[name], make_config(tmp_path, family, seed=1), family.dataset(2), peft_config=lora
    )
    trained = {k: v for k, v in trainer.model.state_dict().items() if "lora_" in k}
    assert any(not torch.equal(v, fresh.model.state_dict()[k]) for k, v in trained.items())
    fresh._load_from_checkpoint(trainer.args.output_dir)
    for k, v in trained.items():
        torch.testing.assert_close(fresh.model.state_dict()[k], v)

    following = PolyDPOTrainer(
        family_paths[name], make_config(tmp_path, family), family.dataset(2), peft_config=lora,
        start_from=trainer.args.output_dir,
    )  # fmt: skip
    batch = following._prepare_inputs(next(iter(following.get_train_dataloader())))  # noise: (seed, row) alone
    with torch.no_grad():
        trained_errors = trainer.denoising_errors(trainer.model, batch, salt=-1)
        start_errors = following.denoising_errors(following.model, batch, salt=-1)
    torch.testing.assert_close(start_errors.ref_chosen, trained_errors.policy_chosen, rtol=1e-3, atol=1e-6)
    assert not torch.allclose(start_errors.ref_chosen, trained_errors.ref_chosen, rtol=1e-5, atol=0)


def test_a_unet_lora_in_the_older_diffusers_key_format_still_resumes(tmp_path, family_paths):
    """Checkpoints written before LoRA files moved to peft's keys (`to_q.lora.down`, diffusers' UNet format) resume."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import load_file, save_file

    family = BY_NAME["sd"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=family.lora_targets, init_lora_weights="gaussian")
    trainer = PolyDPOTrainer(family_paths["sd"], make_config(tmp_path, family, max_steps=1), family.dataset(2),
                             peft_config=lora)  # fmt: skip
    trainer.train()
    trainer.save_model()
    path = f"{trainer.args.output_dir}/pytorch_lora_weights.safetensors"
    older = convert_state_dict_to_diffusers(load_file(path))
    assert all(".lora.down." in k or ".lora.up." in k for k in older)
    save_file(older, path)
    fresh = PolyDPOTrainer(family_paths["sd"], make_config(tmp_path, family, seed=1), family.dataset(2),
                           peft_config=lora)  # fmt: skip
    fresh._load_from_checkpoint(trainer.args.output_dir)
    trained = {k: v for k, v in trainer.model.state_dict().items() if "lora_" in k}
    for k, v in trained.items():
        torch.testing.assert_close(fresh.model.state_dict()[k], v)


def test_per_row_noise_is_drawn_from_each_rows_generator_and_reaches_the_device_without_a_host_wait():
    from torch.utils._python_dispatch import TorchDispatchMode

    from vipo_trl.models.base import randn_like_rows

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                self.calls.append(kwargs)
            return func(*args, **(kwargs or {}))

    noise = randn_like_rows(torch.empty(2, 4, 3, 3), [torch.Generator().manual_seed(s) for s in (7, 1)])
    assert torch.equal(noise[1], torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(1)))  # its own seed only

    # The draws are made on the CPU; a blocking copy to the GPU would synchronise its stream in the middle of a step.
    device_side = torch.empty(2, 4, 3, 3, device="meta", dtype=torch.bfloat16)
    with Copies() as copies:
        noise = randn_like_rows(device_side, [torch.Generator().manual_seed(s) for s in (7, 1)])
    assert (noise.device.type, noise.dtype) == ("meta", torch.bfloat16)
    assert copies.calls == [{"dtype": torch.bfloat16, "device": torch.device("meta"), "non_blocking": True}]


def pipeline_unconditional(name, pipe, prompt):
    """(prompt embeddings, what the pipeline's classifier-free guidance uses with no negative prompt), as our keys."""
    if name == "sd":
        pos, neg = pipe.encode_prompt(prompt, "cpu", 1, True)
        return {"encoder_hidden_states": pos}, {"encoder_hidden_states": neg}
    if name == "sdxl":
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=True)
        return {"encoder_hidden_states": pos, "text_embeds": pooled}, {
            "encoder_hidden_states": neg,
            "text_embeds": neg_pooled,
        }
    if name in ("sd3", "sd35"):
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt, prompt, prompt, device="cpu", do_classifier_free_guidance=True, max_sequence_length=8
        )
        return {"encoder_hidden_states": pos, "pooled_projections": pooled}, {
            "encoder_hidden_states": neg,
            "pooled_projections": neg_pooled,
        }
    if name == "flux":  # FluxPipeline guides (true CFG) only against a negative prompt given; "" stands for none
        pos, pooled, _ = pipe.encode_prompt(prompt, prompt, device="cpu", max_sequence_length=8)
        neg, neg_pooled, _ = pipe.encode_prompt("", "", device="cpu", max_sequence_length=8)
        return {"encoder_hidden_states": pos, "pooled_projections": pooled}, {
            "encoder_hidden_states": neg,
            "pooled_projections": neg_pooled,
        }
    pos, neg = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=True, max_sequence_length=8)
    return {"encoder_hidden_states": pos}, {"encoder_hidden_states": neg}


@pytest.mark.parametrize("force_zeros", [True, False])
@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_the_empty_prompt_is_what_the_pipelines_guidance_conditions_on(tmp_path, family_paths, name, force_zeros):
    """`proportion_empty_prompts` trains the unconditional branch that inference guides from: the pipeline's own
    negative conditioning with no negative prompt (SDXL: zeros under force_zeros_for_empty_prompt, else "")."""
    if name != "sdxl" and not force_zeros:
        pytest.skip("force_zeros_for_empty_prompt is an SDXL pipeline setting")
    family = load_family(family_paths[name], options=make_config(tmp_path, BY_NAME[name]).diffusion_options())
    if name == "sdxl":
        family.pipeline.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    prompt_embeds, expected = pipeline_unconditional(name, family.pipeline, "a red square")
    ours = family.empty_prompt_conditioning()
    ours_prompt = family.encode_prompts(["a red square"])
    assert set(ours) == set(expected) == set(ours_prompt)
    for key in expected:
        torch.testing.assert_close(ours_prompt[key], prompt_embeds[key])
        torch.testing.assert_close(ours[key], expected[key])
        assert not torch.equal(ours[key], ours_prompt[key])
    assert (name == "sdxl" and force_zeros) == all(not v.any() for v in ours.values())


def test_sdxl_empty_prompts_keep_each_pairs_size_and_crop_ids(tmp_path, family_paths):
    family = BY_NAME["sdxl"]
    config = make_config(tmp_path, family, proportion_empty_prompts=0.999)
    trainer = PolyDPOTrainer(family_paths["sdxl"], config, pickapic_dataset(2))
    batch = {
        "prompts": ["a red square", "a blue circle"],
        "pixel_values_chosen": torch.zeros(2, 3, 16, 16),
        "original_sizes": [(40, 30), (16, 16)],
        "crop_top_lefts": [(5, 0), (0, 0)],
    }
    conditioning = trainer.family.encode_conditioning(batch)
    dropped = trainer._drop_prompts(conditioning, [0, 1], salt=0)
    torch.testing.assert_close(dropped["time_ids"], conditioning["time_ids"])
    for key in ("encoder_hidden_states", "text_embeds"):
        assert torch.equal(dropped[key], torch.zeros_like(conditioning[key]))  # the tiny SDXL forces zeros


def test_a_family_of_ones_own_that_encodes_whole_batches_still_trains(tmp_path, family_paths):
    """A family written before `encode_prompts` existed (it overrides `encode_conditioning` only) loads and trains;
    only `proportion_empty_prompts`, which needs `encode_prompts`, is refused, saying so."""
    from vipo_trl.models import StableDiffusionFamily
    from vipo_trl.models.base import DiffusionFamily

    class BatchEncoding(StableDiffusionFamily):
        encode_prompts = DiffusionFamily.encode_prompts

        def encode_conditioning(self, batch):
            embeds, _ = self.pipeline.encode_prompt(batch["prompts"], self.device, 1, False)
            return {"encoder_hidden_states": embeds}

    family = load_family(family_paths["sd"])
    custom = BatchEncoding(family.pipeline)
    config = make_config(tmp_path, BY_NAME["sd"], max_steps=1)
    PolyDPOTrainer(custom, config, pickapic_dataset(2), peft_config=LoraConfig(r=4, lora_alpha=4)).train()
    with pytest.raises(NotImplementedError, match="BatchEncoding does not implement encode_prompts"):
        PolyDPOTrainer(custom, make_config(tmp_path, BY_NAME["sd"], proportion_empty_prompts=0.1), pickapic_dataset(2))
