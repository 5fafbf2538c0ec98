"""push_to_hub against a local fake of the Hub API: the files, the model card's content, and no token in the logs."""

import logging

import pytest
import yaml
from fake_hub import FakeHub
from peft import LoraConfig
from safetensors.torch import load

from vipo_trl import PolyDPOConfig, PolyDPOTrainer
from vipo_trl.testing import pickapic_dataset

TOKEN = "hf_vipo_secret_token_1234567890"


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub.constants as constants
    import transformers.utils.hub as transformers_hub

    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(transformers_hub, "_hf_api", None)  # rebuilt against the fake endpoint
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield hub


def test_push_to_hub_uploads_lora_and_card_without_leaking_the_token(tmp_path, tiny_sd_path, fake_hub, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    args = PolyDPOConfig(
        output_dir=str(tmp_path / "sd-polydpo"),
        resolution=16,
        per_device_train_batch_size=2,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        beta=2500.0,
        poly_alpha=0.5,
        push_to_hub=True,
        hub_model_id="alice/sd-polydpo",
        hub_token=TOKEN,
        hub_strategy="end",
    )
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(4), peft_config=lora)
    trainer.dataset_name = "yuvalkirstain/pickapic_v2"
    trainer.train()
    trainer.push_to_hub()

    files = fake_hub.repos["alice/sd-polydpo"]
    assert {"README.md", "pytorch_lora_weights.safetensors", "poly_dpo_config.json"} <= set(files)
    local = (tmp_path / "sd-polydpo" / "pytorch_lora_weights.safetensors").read_bytes()
    assert files["pytorch_lora_weights.safetensors"] == local  # the uploaded bytes are the saved weights
    assert len(load(local)) > 0 and any(t.abs().sum() > 0 for t in load(local).values())

    card = files["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    # A local base model is named in the text only: the Hub refuses metadata that is not a repo id (as TRL).
    assert "base_model" not in metadata and f"`{tiny_sd_path}`" in card
    assert metadata["datasets"] == ["yuvalkirstain/pickapic_v2"]
    assert metadata["library_name"] == "diffusers" and metadata["pipeline_tag"] == "text-to-image"
    assert {"vipo-trl", "poly-dpo", "lora", "diffusers"} <= set(metadata["tags"])
    assert "### Framework versions" in card and "- trl: " in card and "- diffusers: " in card
    assert "Cite Poly-DPO as:" in card and "2604.24953" in card and "Cite TRL as:" in card
    assert "| loss | 1.0 x poly_dpo |" in card and "| beta (resolved) | 2500.0 |" in card
    assert "| poly_alpha | 0.5 |" in card
    assert "| steps | 2 |" in card and "| method | LoRA (r=4, alpha 4) |" in card
    assert "rewards/accuracies" in card  # final metrics
    assert (
        "pipe = StableDiffusionPipeline.from_pretrained(" in card
        and 'pipe.load_lora_weights("alice/sd-polydpo")' in card
    )
    from vipo_trl import __version__

    assert __version__ in card

    # The token authenticated the requests, and appears nowhere else.
    auth = [{k.lower(): v for k, v in h.items()}.get("authorization") for _, _, h in fake_hub.requests]
    assert f"Bearer {TOKEN}" in auth
    out = capsys.readouterr()
    assert TOKEN not in caplog.text and TOKEN not in out.out and TOKEN not in out.err
    assert all(TOKEN.encode() not in content for content in files.values())


def test_card_metadata_names_hub_ids_only(tmp_path, tiny_sd_path, monkeypatch):
    from vipo_trl.trainer.model_card import build_model_card

    args = PolyDPOConfig(output_dir=str(tmp_path / "out"), resolution=16, report_to=[], use_cpu=True)
    trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(4), peft_config=LoraConfig(r=4, lora_alpha=4))
    monkeypatch.setattr(trainer.family, "name_or_path", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    card = build_model_card(trainer, "alice/x", "yuvalkirstain/pickapic_v2")
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.datasets == ["yuvalkirstain/pickapic_v2"]
    (tmp_path / "pairs.parquet").write_bytes(b"")
    for local in (str(tmp_path / "pairs.parquet"), "my data/with spaces"):
        assert build_model_card(trainer, "alice/x", local).data.datasets is None
    # A training setting away from its default that changes what was learnt is on the card; at its default it is not.
    assert "empty prompts" not in str(card)
    trainer.args.proportion_empty_prompts = 0.1
    assert "| empty prompts (share of pairs) | 0.1 |" in str(build_model_card(trainer, "alice/x", None))


@pytest.mark.parametrize(
    "loss_type, methods, cited, tags, rows",
    [
        (
            ["poly_dpo", "sft"],
            "Poly-DPO, SFT (ViPO: Visual Preference Optimization at Scale, ICLR 2026).",
            ["Poly-DPO"],
            ["poly-dpo", "sft"],
            ["| poly_alpha | 8.0 |"],
        ),
        (["dpo"], "Diffusion-DPO.", ["Diffusion-DPO"], ["diffusion-dpo"], []),
        (
            ["mapo"],
            "MaPO.",
            ["MaPO"],
            ["mapo"],
            ["| mapo_beta | 0.1 |", "| mapo_snr | 0.5 |", "| mapo_margin_scale | 1000.0 |"],
        ),
        (["robust"], "Robust DPO.", ["Robust DPO", "Diffusion-DPO"], ["robust-dpo"], ["| label_smoothing | 0.2 |"]),
    ],
)
def test_the_card_names_the_methods_the_run_used_and_cites_them(
    tmp_path, tiny_sd_path, loss_type, methods, cited, tags, rows
):
    """A card credits the paper of each loss trained with (the ViPO paper only for Poly-DPO), cites and tags those
    alone, and lists the settings those losses read (poly_alpha=8 is set for every run: the config warns where no
    loss reads it, and the card leaves it out)."""
    import contextlib

    from vipo_trl.trainer.model_card import build_model_card

    smoothing = 0.2 if "robust" in loss_type else 0.0
    unread = "poly_dpo" not in loss_type
    with pytest.warns(UserWarning, match="poly_alpha=8.0 has no effect") if unread else contextlib.nullcontext():
        args = PolyDPOConfig(
            output_dir=str(tmp_path / "out"), resolution=16, report_to=[], use_cpu=True, loss_type=loss_type,
            poly_alpha=8.0, label_smoothing=smoothing,
        )  # fmt: skip
    trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(4), peft_config=LoraConfig(r=4, lora_alpha=4))
    card = build_model_card(trainer, "alice/x", None)
    text = str(card)
    assert f"aligned with human preferences by {methods}" in text
    assert sorted(line[5:-4] for line in text.splitlines() if line.startswith("Cite ")) == sorted([*cited, "TRL"])
    assert card.data.tags == ["vipo-trl", "diffusers", *tags, "lora", "text-to-image"]
    settings = [
        line for line in text.splitlines() if line.startswith(("| poly_alpha", "| label_", "| mapo_", "| kto_"))
    ]
    assert settings == rows


def test_a_card_names_the_repo_of_the_pushed_run_this_one_started_from(tmp_path, tiny_sd_path, fake_hub, caplog):
    """Two stages pushed in turn: stage 2 started from stage 1's local folder, and its card's loading code and
    "started from" line name stage 1's repo (recorded when stage 1 was pushed), not a path on the trainer's disk.
    A stage 2 started from a run that was never pushed is pushed with a warning naming that folder."""

    def run(name, start_from=None, push=True):
        args = PolyDPOConfig(
            output_dir=str(tmp_path / name), resolution=16, per_device_train_batch_size=2, max_steps=1,
            save_strategy="no", report_to=[], use_cpu=True, push_to_hub=push, hub_model_id=f"alice/{name}",
            hub_token=TOKEN,
        )  # fmt: skip
        lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights="gaussian")
        trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(4), peft_config=lora, start_from=start_from)
        trainer.train()
        if push:
            trainer.push_to_hub()
        else:
            trainer.save_model()

    run("stage1")
    run("stage2", start_from=str(tmp_path / "stage1"))
    card = fake_hub.repos["alice/stage2"]["README.md"].decode()
    assert 'pipe.load_lora_weights("alice/stage1"); pipe.fuse_lora(); pipe.unload_lora_weights()' in card
    assert "| started from | alice/stage1 |" in card and str(tmp_path) not in card
    assert 'pipe.load_lora_weights("alice/stage2")' in card

    run("local", push=False)
    with caplog.at_level(logging.WARNING):
        run("stage2b", start_from=str(tmp_path / "local"))
    assert str(tmp_path / "local") in fake_hub.repos["alice/stage2b"]["README.md"].decode()
    assert f"names {tmp_path / 'local'}, the local folder(s)" in caplog.text


@pytest.mark.parametrize(
    "settings, method",
    [
        ({"lora_alpha": 8}, "LoRA (r=4, alpha 8)"),
        ({"lora_alpha": 8, "use_dora": True, "use_rslora": True}, "DoRA (r=4, alpha 8, rsLoRA scaling)"),
    ],
)
def test_the_card_says_which_adapter_was_trained(tmp_path, tiny_sd_path, settings, method):
    from vipo_trl.trainer.model_card import build_model_card

    args = PolyDPOConfig(output_dir=str(tmp_path / "out"), resolution=16, report_to=[], use_cpu=True)
    lora = LoraConfig(r=4, target_modules=["to_q", "to_v"], **settings)
    trainer = PolyDPOTrainer(tiny_sd_path, args, pickapic_dataset(4), peft_config=lora)
    assert f"| method | {method} |" in str(build_model_card(trainer, "alice/x", None))
