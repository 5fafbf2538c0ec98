"""The `vipo-trl` command: flags, YAML configs, misspellings, the cache command, `env` and `python -m`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vipo_trl.cli import main
from vipo_trl.testing import pickapic_dataset


@pytest.fixture
def parquet(tmp_path):
    path = tmp_path / "pairs.parquet"
    pickapic_dataset(6, ties=1).to_parquet(str(path))
    return str(path)


def common(tmp_path, out="run"):
    return [
        "--output_dir", str(tmp_path / out), "--resolution", "16", "--per_device_train_batch_size", "2",
        "--max_steps", "2", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
    ]  # fmt: skip


def saved_config(tmp_path, out="run"):
    return json.loads((tmp_path / out / "poly_dpo_config.json").read_text())


def test_train_with_flags_saves_a_lora(tmp_path, tiny_sd_path, parquet):
    main(["train", "--model_name_or_path", tiny_sd_path, "--dataset_name", parquet, "--use_peft", "--lora_r", "4",
          "--beta", "3000", "--poly_alpha", "0.5", *common(tmp_path)])  # fmt: skip
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    config = saved_config(tmp_path)
    assert config["beta"] == 3000 and config["poly_alpha"] == 0.5 and config["loss_type"] == ["poly_dpo"]


@pytest.mark.filterwarnings("error:Already found a `peft_config`:UserWarning")  # the second adapter is intended
def test_ref_model_trains_a_next_round_against_an_earlier_lora(tmp_path, tiny_sd_path, parquet, capsys):
    """Round 1's LoRA as round 2's reference: round 2's policy starts as the base (a fresh LoRA adds zero), so its
    first Diffusion-DPO loss is ln 2 = 0.6931 against the base and something else against round 1's model."""
    import re

    base = ["train", "--model_name_or_path", tiny_sd_path, "--dataset_name", parquet, "--use_peft", "--lora_r", "4",
            "--loss_type", "diffusion_dpo", "--beta", "5000"]  # fmt: skip
    main([*base, *common(tmp_path, "round1"), "--learning_rate", "0.05"])

    def first_loss(out, *extra):
        capsys.readouterr()
        main([*base, *common(tmp_path, out), "--max_steps", "1", "--logging_steps", "1", *extra])
        return float(re.search(r"'loss': '([0-9.e+-]+)'", capsys.readouterr().out).group(1))

    assert first_loss("against_base") == pytest.approx(0.6931, abs=1e-4)
    assert abs(first_loss("round2", "--ref_model", str(tmp_path / "round1")) - 0.6931) > 1e-3
    assert (tmp_path / "round2" / "pytorch_lora_weights.safetensors").is_file()
    for bad, message in [(tmp_path / "nowhere", "no such folder"), (tmp_path, "neither a LoRA folder")]:
        with pytest.raises(SystemExit):
            main([*base, *common(tmp_path, "bad"), "--ref_model", str(bad)])
        assert f"--ref_model {bad}: {message}" in capsys.readouterr().err


def test_yaml_config_with_flags_overriding_it(tmp_path, tiny_sd_path, parquet):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        f"model_name_or_path: {tiny_sd_path}\ndataset_name: {parquet}\nuse_peft: true\nlora_r: 4\n"
        "loss_type: [poly_dpo, sft]\nloss_weights: [1.0, 0.1]\nbeta: 1000\npoly_alpha: 2.0\n"
    )
    main(["train", "--config", str(yaml_file), "--beta", "2000", *common(tmp_path)])
    config = saved_config(tmp_path)
    assert config["beta"] == 2000 and config["poly_alpha"] == 2.0  # the flag wins, the file fills the rest
    assert config["loss_type"] == ["poly_dpo", "sft"] and config["loss_weights"] == [1.0, 0.1]


def test_misspelt_flag_suggests_the_right_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--poly_alpah", "0.5", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "unrecognized argument '--poly_alpah'. Did you mean 'poly_alpha'?" in capsys.readouterr().err


def test_a_trl_dpo_yaml_runs_with_only_model_data_and_loss_changed(
    tmp_path, tiny_sd_path, parquet, monkeypatch, recwarn
):
    """The YAML of a `trl dpo` run (TRL's field names, an `env:` section), with only the model, the dataset and the
    loss fields changed, as docs/cli.md shows side by side."""
    monkeypatch.delenv("VIPO_TEST_ENV", raising=False)
    yaml_file = tmp_path / "dpo.yaml"
    yaml_file.write_text(
        "env:\n  VIPO_TEST_ENV: from-yaml\n"
        f"model_name_or_path: {tiny_sd_path}\n"  # changed: a diffusers pipeline
        f"dataset_name: {parquet}\n"  # changed: a preference set of images
        "dataset_train_split: train\n"
        "loss_type: poly_dpo\nbeta: 2000\npoly_alpha: 0.5\n"  # changed: TRL's sigmoid/beta 0.1
        "learning_rate: 5.0e-7\nper_device_train_batch_size: 2\ngradient_accumulation_steps: 2\n"
        "gradient_checkpointing: true\nlogging_steps: 1\nmax_steps: 2\nresolution: 16\n"
        "use_peft: true\nlora_r: 8\nlora_alpha: 16\nlora_dropout: 0.0\n"
        f"output_dir: {tmp_path / 'run'}\nreport_to: none\nuse_cpu: true\nsave_strategy: 'no'\n"
    )
    main(["train", "--config", str(yaml_file)])
    import os

    assert os.environ["VIPO_TEST_ENV"] == "from-yaml"
    config = saved_config(tmp_path)
    assert config["gradient_checkpointing"] is True and config["gradient_accumulation_steps"] == 2
    # TRL's flag name works without transformers' deprecation notice for it (the name `trl dpo` users know)
    assert not [w for w in recwarn if "gradient_checkpointing" in str(w.message)]
    assert config["beta"] == 2000 and config["poly_alpha"] == 0.5 and config["learning_rate"] == 5e-7
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "pytorch_lora_weights.safetensors"), "pt") as f:
        adapter = json.loads(f.metadata()["lora_adapter_metadata"])
    assert adapter["unet.r"] == 8 and adapter["unet.lora_alpha"] == 16  # TRL's LoRA flags reached peft


def test_old_flag_names_point_to_trls(tmp_path, capsys):
    for old, new in (
        ("--model", "model_name_or_path"),
        ("--dataset", "dataset_name"),
        ("--split", "dataset_train_split"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", old, "x", "--output_dir", str(tmp_path)])
        assert exit_info.value.code == 2
        assert f"unrecognized argument '{old}'. Did you mean '{new}'?" in capsys.readouterr().err


def test_the_diffusion_dpo_scripts_flags_say_what_to_write_here(tmp_path, capsys):
    from vipo_trl.cli.parser import FROM_DIFFUSION_DPO_SCRIPTS

    docs = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    for flag, replacement in FROM_DIFFUSION_DPO_SCRIPTS.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["train", f"--{flag}", "1", "--output_dir", str(tmp_path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"unrecognized argument '--{flag}'. That is a flag of the Diffusion-DPO training scripts" in err, err
        assert replacement in err
        assert f"`--{flag}" in docs  # and docs/cli.md's table lists it
    (tmp_path / "run.yaml").write_text("max_train_steps: 10\n")
    with pytest.raises(SystemExit):
        main(["train", "--config", str(tmp_path / "run.yaml")])
    assert "unknown key 'max_train_steps'" in (err := capsys.readouterr().err) and "here: --max_steps." in err


def test_reward_scorers_log_the_validation_prompts_rewards_during_training(tmp_path, tiny_sd_path, parquet, capsys):
    import re

    import numpy as np

    from vipo_trl.eval import RewardScorer, register_scorer

    @register_scorer("test_brightness", override=True)
    class Brightness(RewardScorer):
        def _score_batch(self, images, prompts):
            return torch.tensor([float(np.asarray(image.convert("RGB"), dtype=np.float32).mean()) for image in images])

    base = ["train", "--model_name_or_path", tiny_sd_path, "--dataset_name", parquet, "--use_peft", "--lora_r", "4"]
    main([*base, *common(tmp_path), "--logging_steps", "1", "--validation_prompts", "a red square", "a blue circle",
          "--validation_steps", "1", "--reward_scorers", "test_brightness"])  # fmt: skip
    logged = re.findall(r"'reward/test_brightness': '([0-9.e+-]+)'", printed := capsys.readouterr().out)
    assert len(logged) == 2 and all(0 < float(v) < 255 for v in logged)  # steps 1 and 2
    assert printed.count("'reward/test_brightness_win_rate'") == 2
    for extra, message in (
        ([], "give those prompts too"),  # no --validation_prompts to score
        (["--validation_prompts", "x"], "Did you mean 'test_brightness'"),  # an unknown scorer: one line
    ):
        scorer = "test_brightness" if not extra else "test_brightnes"
        with pytest.raises(SystemExit):
            main([*base, *common(tmp_path, "bad"), "--reward_scorers", scorer, *extra])
        assert message in capsys.readouterr().err


def test_misspelt_yaml_key_message(tmp_path, capsys):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("bta: 5000\n")
    with pytest.raises(SystemExit):
        main(["train", "--config", str(yaml_file)])
    err = capsys.readouterr().err
    assert "unknown key 'bta'" in err and "Did you mean 'beta'?" in err


def test_out_of_range_value_is_a_clean_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--beta", "-1", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "PolyDPOConfig.beta=-1.0 is out of range" in err and "Traceback" not in err


def test_unknown_command_and_help(capsys):
    with pytest.raises(SystemExit):
        main(["trian"])
    assert "Did you mean 'train'?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--beta", "--poly_alpha", "--loss_type", "--use_peft", "--lora_target_modules", "--dataset_name"):
        assert flag in help_text


def test_cache_command_then_train_from_it(tmp_path, tiny_sd_path, parquet):
    cache = tmp_path / "cache"
    main(["cache", "--model_name_or_path", tiny_sd_path, "--dataset_name", parquet, "--cache_output", str(cache),
          "--resolution", "16", "--output_dir", str(tmp_path / "unused")])  # fmt: skip
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_pairs"] == 6
    main(
        [
            "train",
            "--model_name_or_path",
            tiny_sd_path,
            "--dataset_name",
            str(cache),
            "--use_peft",
            "--lora_r",
            "4",
            *common(tmp_path),
        ]
    )
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


def test_env_and_python_dash_m(tmp_path):
    def env_output(hf_home):
        environ = {**os.environ, "HF_HOME": str(hf_home)}
        command = [sys.executable, "-m", "vipo_trl", "env"]
        return subprocess.run(command, capture_output=True, text=True, check=True, env=environ).stdout

    out = env_output(tmp_path)
    for name in ("vipo-trl", "torch", "diffusers", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "CUDA"):
        assert name in out
    assert "accelerate config: not found" in out
    # A bug report on a multi-GPU run needs the launch settings, as `trl env` prints them.
    (tmp_path / "accelerate").mkdir()
    (tmp_path / "accelerate" / "default_config.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 8\nmixed_precision: bf16\n"
    )
    out = env_output(tmp_path)
    assert "- distributed_type: MULTI_GPU" in out and "- num_processes: 8" in out and "- mixed_precision: bf16" in out


def accelerate_launch(port: int) -> list[str]:
    # --multi_gpu starts one process per rank; without GPUs they train on the CPU over gloo (with --use_cpu).
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launch, "--main_process_port", str(port)]


@pytest.mark.slow
def test_the_command_runs_unchanged_under_accelerate_launch(tmp_path, tiny_sd_path, parquet):
    launch = accelerate_launch(29523)
    command = [
        "-m",
        "vipo_trl",
        "train",
        "--model_name_or_path",
        tiny_sd_path,
        "--dataset_name",
        parquet,
        "--use_peft",
        "--lora_r",
        "4",
    ]
    command += ["--log_level", "info"]  # Trainer then states the global batch, which counts the processes
    result = subprocess.run([*launch, *command, *common(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # Two ranks of 2 pairs each: a global batch of 4 (one process would say 2).
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in result.stdout + result.stderr
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert saved_config(tmp_path)["per_device_train_batch_size"] == 2


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs the launched processes train together")
def test_processes_that_would_each_train_alone_are_refused(tmp_path, tiny_sd_path, parquet):
    """Without --use_cpu on a machine without GPUs, transformers runs each launched process as a run of its own
    (world size 1): two identical runs writing one output_dir. Refused before the model loads."""
    command = ["-m", "vipo_trl", "train", "--model_name_or_path", tiny_sd_path, "--dataset_name", parquet]
    options = [a for a in common(tmp_path) if a != "--use_cpu"]
    result = subprocess.run(
        [*accelerate_launch(29524), *command, *options], capture_output=True, text=True, timeout=600
    )
    assert result.returncode != 0
    assert result.stderr.count("vipo-trl: error: This process is one of 2 launched") == 2, result.stderr[-3000:]
    assert "set use_cpu=True (--use_cpu)" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_trl_datasets_mixture_trains_on_both_sets_and_holds_out_test_split_size(tmp_path, tiny_sd_path, monkeypatch):
    """The `datasets:` list of a `trl dpo` YAML (TRL's DatasetMixtureConfig): both sets in training, a seeded share
    held out for evaluation, both named in the model card."""
    import vipo_trl.trainer

    seen = {}

    class Recording(vipo_trl.trainer.PolyDPOTrainer):
        def __init__(self, model, args, train_dataset, eval_dataset=None, **kwargs):
            seen["train"], seen["eval"] = list(train_dataset["caption"]), list(eval_dataset["caption"])
            super().__init__(model, args, train_dataset, eval_dataset=eval_dataset, **kwargs)

    monkeypatch.setattr(vipo_trl.trainer, "PolyDPOTrainer", Recording)
    pickapic_dataset(6).to_parquet(str(tmp_path / "a.parquet"))
    other = pickapic_dataset(6).map(lambda row: {"caption": row["caption"].replace("red", "other")})
    other.save_to_disk(str(tmp_path / "b"))
    yaml_file = tmp_path / "mix.yaml"
    yaml_file.write_text(
        f"model_name_or_path: {tiny_sd_path}\n"
        f"datasets:\n  - path: {tmp_path / 'a.parquet'}\n  - path: {tmp_path / 'b'}\n    split: train\n"
        "test_split_size: 0.25\neval_strategy: steps\neval_steps: 2\nsave_strategy: steps\nsave_steps: 2\n"
        "use_peft: true\nlora_r: 4\n"
    )
    args = [a for a in common(tmp_path) if a not in ("--save_strategy", "no")]
    main(["train", "--config", str(yaml_file), *args])

    assert len(seen["train"]) == 9 and len(seen["eval"]) == 3 and not set(seen["train"]) & set(seen["eval"])
    assert {c.split()[1] for c in seen["train"] + seen["eval"]} == {"red", "other"}
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    assert any("eval_loss" in entry for entry in state["log_history"])
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"{tmp_path / 'a.parquet'}, {tmp_path / 'b'}" in card


def test_a_datasets_mixture_is_refused_with_one_line_when_it_cannot_be_used(tmp_path, tiny_sd_path, parquet, capsys):
    pickapic_dataset(4).save_to_disk(str(tmp_path / "b"))
    mixture = f"model_name_or_path: {tiny_sd_path}\ndatasets:\n  - path: {parquet}\n  - path: {tmp_path / 'b'}\n"
    cases = [
        ("dataset_name: x\n", "give --dataset_name or a `datasets:` mixture, not both"),
        ("eval_strategy: steps\n", "has the split(s) ['train'], not 'test' (set test_split_size"),
        ("  - pth: y\n", "datasets[2] has the unknown key 'pth'. Did you mean 'path'?"),
    ]
    for extra, message in cases:
        (tmp_path / "mix.yaml").write_text(mixture + extra)
        with pytest.raises(SystemExit):
            main(["train", "--config", str(tmp_path / "mix.yaml"), *common(tmp_path)])
        assert message in capsys.readouterr().err


def test_cache_command_builds_one_cache_of_a_datasets_mixture(tmp_path, tiny_sd_path, parquet):
    pickapic_dataset(4).save_to_disk(str(tmp_path / "b"))  # the sets as flags (the train test gives them in YAML)
    main(["cache", "--datasets", parquet, str(tmp_path / "b"), "--model_name_or_path", tiny_sd_path, "--cache_output",
          str(tmp_path / "cache"), "--resolution", "16", "--output_dir", str(tmp_path / "unused")])  # fmt: skip
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_pairs"] == 6 + 4 and manifest["skipped"] == {"tie": 1}


def test_trl_dpo_fields_without_a_counterpart_say_why_instead_of_a_misleading_nearest_name(tmp_path, capsys):
    from vipo_trl.cli.parser import FROM_TRL_DPO

    docs = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    for field, reason in FROM_TRL_DPO.items():
        (tmp_path / "dpo.yaml").write_text(f"{field}: 1\n")
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--config", str(tmp_path / "dpo.yaml")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"unknown key {field!r}" in err, err
        assert f"That is a field of trl's DPOConfig; here: {reason}." in err and "Did you mean" not in err
        assert f"`{field}`" in docs  # and docs/cli.md's table lists it
    with pytest.raises(SystemExit):
        main(["train", "--max_length", "1024"])
    assert "here: a sample's size is --resolution" in capsys.readouterr().err


def test_dataset_streaming_streams_a_datasets_mixture_too(tmp_path, parquet):
    """TRL has two names for it (ScriptArguments.dataset_streaming, DatasetMixtureConfig.streaming): either streams."""
    from vipo_trl.cli.help import parser_for
    from vipo_trl.cli.main import _training_data

    for flag in ("--dataset_streaming", "--streaming"):
        argv = ["--datasets", parquet, parquet, flag, "true", "--output_dir", str(tmp_path)]
        script, _, _, config, mixture = parser_for("train").parse(argv)
        train, held_out, where = _training_data(script, mixture, config, with_eval=False)
        assert type(train).__name__ == "IterableDataset" and held_out is None and where == "the `datasets:` mixture"
        assert sum(1 for _ in train) == 2 * 7  # both sets, ties included (they are dropped as pairs are read)


def test_start_from_trains_a_second_stage_on_top_of_an_earlier_run(
    tmp_path, tiny_sd_path, parquet, capsys, monkeypatch
):
    lora = ["--use_peft", "--lora_r", "4"]
    main(["train", "--model_name_or_path", tiny_sd_path, "--dataset_name", parquet, "--loss_type", "sft", *lora,
          *common(tmp_path, "sft")])  # fmt: skip
    monkeypatch.chdir(tmp_path)  # named relative to here; recorded so that it is found from anywhere
    main(["train", "--model_name_or_path", tiny_sd_path, "--dataset_name", parquet, "--start_from", "sft", *lora,
          *common(tmp_path, "dpo")])  # fmt: skip
    described = json.loads((tmp_path / "dpo" / "vipo_trl_model.json").read_text())
    assert described["started_from"] == [[str(tmp_path / "sft"), "lora"]]
    named = ["--model_name_or_path", tiny_sd_path, "--dataset_name", parquet]
    for argv, message in [
        ([*named, "--start_from", str(tmp_path / "none")], f"--start_from {tmp_path}/none: not a"),
        (["--start_from", "sft"], "--start_from needs --model_name_or_path and --dataset_name"),
        (
            [*named, "--start_from", "sft", *lora, "--load_in_4bit"],  # refused before the 4-bit model loads
            "--start_from fuses earlier runs into the base, which cannot be done to a base loaded in 4/8 bits",
        ),
    ]:
        with pytest.raises(SystemExit):
            main(["train", *argv, *common(tmp_path, "x")])
        assert message in capsys.readouterr().err

    # The second stage as a reference on the bare base would be a model nobody trained: refused before loading
    import vipo_trl.trainer

    monkeypatch.setattr(vipo_trl.trainer, "PolyDPOTrainer", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit):
        main(["train", *named, "--ref_model", "dpo", *lora, *common(tmp_path, "x")])
    err = capsys.readouterr().err
    assert f"--ref_model dpo: that LoRA was trained on top of {tmp_path / 'sft'}, but this run's base is" in err
    assert "pass --start_from dpo instead" in err
    assert f"keep it as the reference, pass --start_from {tmp_path / 'sft'}." in err


def test_resuming_without_the_runs_start_from_is_refused_before_the_model_loads(
    tmp_path, tiny_sd_path, parquet, capsys, monkeypatch
):
    import vipo_trl.trainer

    lora = ["--use_peft", "--lora_r", "4"]
    main(["train", "--model_name_or_path", tiny_sd_path, "--dataset_name", parquet, *lora, *common(tmp_path, "one")])
    options = [a for a in common(tmp_path, "two") if a not in ("--save_strategy", "no")] + ["--save_steps", "1"]
    start = ["--start_from", str(tmp_path / "one")]
    main(["train", "--model_name_or_path", tiny_sd_path, "--dataset_name", parquet, *lora, *start, *options])

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the mismatch was found")

    monkeypatch.setattr(vipo_trl.trainer, "PolyDPOTrainer", no_loading)
    with pytest.raises(SystemExit):
        main(["train", "--model_name_or_path", tiny_sd_path, "--dataset_name", parquet, *lora, *options,
              "--resume_from_checkpoint", "latest"])  # fmt: skip
    err = capsys.readouterr().err
    assert "checkpoint-2 was trained starting from [" in err and "pass the same start_from (--start_from)" in err
