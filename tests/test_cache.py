"""The latent cache: exact, encoder-free training, refusal of a foreign cache, resume after an interruption."""

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

import vipo_trl.trainer.cache_builder as cache_module
import vipo_trl.trainer.poly_dpo_trainer as trainer_module
from vipo_trl import PolyDPOConfig, PolyDPOTrainer, build_latent_cache
from vipo_trl.data import LatentCacheDataset, PreferenceDataError, read_manifest
from vipo_trl.testing import pickapic_dataset


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        resolution=16,
        per_device_train_batch_size=2,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        learning_rate=1e-2,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        center_crop=False,
        random_flip=True,
        poly_alpha=0.5,
    )
    base.update(kw)
    return PolyDPOConfig(**base)


def lora():
    return LoraConfig(
        r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian"
    )


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_training_from_the_cache_gives_the_raw_losses_without_loading_encoders(tmp_path, tiny_sd_path):
    data = pickapic_dataset(6, ties=1)
    cache = build_latent_cache(tiny_sd_path, data, tmp_path / "cache", config(tmp_path), shard_size=4, batch_size=2)
    manifest = read_manifest(cache)
    assert manifest["complete"] and manifest["num_pairs"] == 6 and manifest["skipped"] == {"tie": 1}
    assert [s["num_pairs"] for s in manifest["shards"]] == [4, 2]
    assert manifest["settings"]["resolution"] == 16 and manifest["settings"]["model"] == tiny_sd_path

    raw = PolyDPOTrainer(tiny_sd_path, config(tmp_path), data, peft_config=lora())
    cached = PolyDPOTrainer(tiny_sd_path, config(tmp_path), cache, peft_config=lora())
    assert cached.family.pipeline.vae is None and cached.family.pipeline.text_encoder is None

    # The same pairs give the same denoising errors (same latent sample, noise and timestep per row).
    raw_batch = raw._prepare_inputs(raw.data_collator([raw.train_dataset[i] for i in (1, 4)]))
    cached_batch = cached._prepare_inputs(cached.data_collator([cached.train_dataset[i] for i in (1, 4)]))
    assert raw_batch["row_index"] == cached_batch["row_index"]
    with torch.no_grad():
        raw_errors = raw.denoising_errors(raw.model, raw_batch, salt=3)
        cached_errors = cached.denoising_errors(cached.model, cached_batch, salt=3)
    for field in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"):
        torch.testing.assert_close(getattr(cached_errors, field), getattr(raw_errors, field), rtol=1e-6, atol=1e-7)

    # And a whole run logs the same losses: the first step exactly; later ones up to float rounding, which
    # beta = 2000 and a high learning rate amplify.
    raw.train()
    cached.train()
    assert losses(cached)[0] == pytest.approx(losses(raw)[0], rel=1e-6)
    np.testing.assert_allclose(losses(cached), losses(raw), rtol=1e-3)


def test_building_a_cache_far_from_the_models_native_size_is_warned(tmp_path, tiny_sd_path, caplog):
    """The tiny model is built for 16 px images: a 64 px cache (every image upscaled, 16x the cost) is warned
    before any image is encoded, a 16 px one is not."""
    with caplog.at_level("WARNING", logger="vipo_trl"):
        build_latent_cache(tiny_sd_path, pickapic_dataset(2), tmp_path / "c16", config(tmp_path), show_progress=False)
        assert not [r for r in caplog.records if "built for 16 px" in r.getMessage()]
        build_latent_cache(
            tiny_sd_path, pickapic_dataset(2), tmp_path / "c64", config(tmp_path, resolution=64), show_progress=False
        )
    (warning,) = [r.getMessage() for r in caplog.records if "built for 16 px" in r.getMessage()]
    assert "resolution=64" in warning and "16x" in warning


def test_a_cache_for_another_model_or_resolution_is_refused(tmp_path, tiny_sd_path, tiny_sd_v_path):
    cache = build_latent_cache(tiny_sd_path, pickapic_dataset(2), tmp_path / "cache", config(tmp_path))
    with pytest.raises(
        PreferenceDataError, match="made for another model or preprocessing.*resolution: cache 16 vs now 32"
    ):
        PolyDPOTrainer(tiny_sd_path, config(tmp_path, resolution=32), cache, peft_config=lora())
    with pytest.raises(PreferenceDataError, match="made for another model.*model: cache"):
        PolyDPOTrainer(tiny_sd_v_path, config(tmp_path), cache, peft_config=lora())
    with pytest.raises(PreferenceDataError, match="other settings.*resolution"):
        build_latent_cache(tiny_sd_path, pickapic_dataset(2), cache, config(tmp_path, resolution=32))


def test_an_interrupted_build_resumes_where_it_stopped(tmp_path, tiny_sd_path, monkeypatch):
    data = pickapic_dataset(6)
    args = config(tmp_path)
    whole = build_latent_cache(tiny_sd_path, data, tmp_path / "whole", args, shard_size=2, batch_size=2)

    real_encode, calls = cache_module.encode_for_cache, []

    def failing_encode(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user (or the scheduler) stops the job in the third shard
        return real_encode(*a, **k)

    monkeypatch.setattr(cache_module, "encode_for_cache", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(tiny_sd_path, data, tmp_path / "part", args, shard_size=2, batch_size=2)
    assert read_manifest(tmp_path / "part")["num_pairs"] == 4
    assert not list((tmp_path / "part").glob("*.tmp"))
    with pytest.raises(PreferenceDataError, match="incomplete"):
        LatentCacheDataset(tmp_path / "part")

    calls.clear()
    build_latent_cache(tiny_sd_path, data, tmp_path / "part", args, shard_size=2, batch_size=2)
    assert len(calls) == 1  # only the missing shard is encoded
    for shard in read_manifest(whole)["shards"]:
        expected, got = load_file(f"{whole}/{shard['file']}"), load_file(tmp_path / "part" / shard["file"])
        for key in expected:
            torch.testing.assert_close(got[key], expected[key])


def test_a_streaming_dataset_caches_like_the_map_style_one(tmp_path, tiny_sd_path):
    data = pickapic_dataset(4, ties=1)
    args = config(tmp_path)
    mapped = LatentCacheDataset(build_latent_cache(tiny_sd_path, data, tmp_path / "a", args, batch_size=2))
    streamed = LatentCacheDataset(
        build_latent_cache(tiny_sd_path, data.to_iterable_dataset(), tmp_path / "b", args, batch_size=2)
    )
    assert len(mapped) == len(streamed) == 4
    assert read_manifest(tmp_path / "b")["skipped"] == {"tie": 1}
    for i in range(4):
        for key, value in mapped[i].items():
            if torch.is_tensor(value):
                torch.testing.assert_close(streamed[i][key], value)
            else:
                assert streamed[i][key] == value


def test_cache_of_a_flow_family_with_pooled_embeddings(tmp_path):
    from families import FAMILIES, assert_every_lora_b_moved, lora_b

    family = next(f for f in FAMILIES if f.name == "sd3")
    family.build().save_pretrained(tmp_path / "sd3")
    args = config(tmp_path, resolution=8, max_sequence_length=8, beta=100.0)
    cache = build_latent_cache(str(tmp_path / "sd3"), pickapic_dataset(4), tmp_path / "cache", args)
    assert read_manifest(cache)["conditioning_keys"] == ["encoder_hidden_states", "pooled_projections"]
    trainer = PolyDPOTrainer(str(tmp_path / "sd3"), args, cache, peft_config=lora())
    assert trainer.family.pipeline.text_encoder_3 is None and trainer.family.pipeline.vae is None
    before = lora_b(trainer.model)
    trainer.train()
    assert all(np.isfinite(losses(trainer)))
    assert_every_lora_b_moved(trainer.model, before)
    assert json.loads(json.dumps(read_manifest(cache)))["settings"]["max_sequence_length"] == 8


def test_empty_prompts_from_the_cache_are_those_of_training_on_raw_pairs(tmp_path, tiny_sd_path, monkeypatch):
    data = pickapic_dataset(6)
    args = config(tmp_path, proportion_empty_prompts=0.5)
    cache = build_latent_cache(tiny_sd_path, data, tmp_path / "cache", args, batch_size=3)
    raw = PolyDPOTrainer(tiny_sd_path, args, data, peft_config=lora())
    cached = PolyDPOTrainer(tiny_sd_path, args, cache, peft_config=lora())
    assert cached.family.pipeline.text_encoder is None  # the empty prompt comes from the cache
    torch.testing.assert_close(cached.empty_prompt, raw.family.empty_prompt_conditioning())
    rows = list(range(6))
    raw_batch = raw._prepare_inputs(raw.data_collator([raw.train_dataset[i] for i in rows]))
    cached_batch = cached._prepare_inputs(cached.data_collator([cached.train_dataset[i] for i in rows]))
    for salt in (0, 1):  # steps with different pairs drawn
        with torch.no_grad():
            raw_errors = raw.denoising_errors(raw.model, raw_batch, salt=salt)
            cached_errors = cached.denoising_errors(cached.model, cached_batch, salt=salt)
        torch.testing.assert_close(cached_errors.policy_chosen, raw_errors.policy_chosen, rtol=1e-6, atol=1e-7)
        empty, raw.empty_prompt = raw.empty_prompt, None
        with torch.no_grad():
            every_prompt = raw.denoising_errors(raw.model, raw_batch, salt=salt)
        raw.empty_prompt = empty
        assert not torch.allclose(every_prompt.policy_chosen, raw_errors.policy_chosen)  # some pairs were drawn

    # A cache built before the empty prompt was stored: refused before any model loads, naming the fix; running
    # the same build again adds it without encoding a pair again.
    (tmp_path / "cache" / "empty_prompt.safetensors").unlink()
    monkeypatch.setattr(trainer_module, "load_family", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(PreferenceDataError, match="no empty_prompt.safetensors.*again with the same arguments"):
        PolyDPOTrainer(tiny_sd_path, args, cache, peft_config=lora())
    monkeypatch.undo()
    monkeypatch.setattr(cache_module, "encode_for_cache", lambda *a, **k: pytest.fail("re-encoded a pair"))
    build_latent_cache(tiny_sd_path, data, tmp_path / "cache", args, batch_size=3)
    torch.testing.assert_close(LatentCacheDataset(cache).empty_prompt_conditioning(), cached.empty_prompt)
