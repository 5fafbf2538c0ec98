"""The first hour of a new user: flags mean what they say in the default run, and every bad input is one line
(`vipo-trl: error: ...`, exit status 2) before any model is loaded."""

import json
import os

import pytest
from datasets import Dataset

from vipo_trl.cli import main
from vipo_trl.testing import pickapic_dataset


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if anything loads a pipeline: every check must come first."""
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", refuse)


def one_line_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, err
    errors = [line for line in err if line.startswith("vipo-trl: error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def common(tmp_path):
    return ["--output_dir", str(tmp_path / "run"), "--report_to", "none", "--use_cpu", "true"]


# ------------------------------------------------------------------ the default run obeys its flags


def parsed_default(argv):
    from trl import ModelConfig, ScriptArguments

    from vipo_trl.cli.parser import VipoArgumentParser
    from vipo_trl.default import apply_default_settings
    from vipo_trl.trainer import PolyDPOConfig

    parser = VipoArgumentParser([ScriptArguments, ModelConfig, PolyDPOConfig], prog="vipo-trl train")
    _, _, config = parser.parse(argv)
    return apply_default_settings(config, given=parser.given)


def test_default_run_keeps_flags_equal_to_transformers_defaults():
    # Each value equals TrainingArguments' default, which the old code mistook for "not given".
    config = parsed_default(["--seed", "42", "--learning_rate", "1e-5", "--output_dir", "trainer_output"])
    assert config.seed == 42 and config.learning_rate == 1e-5 and config.output_dir == "trainer_output"
    untouched = parsed_default([])
    assert untouched.seed == 0 and untouched.learning_rate == 3e-3 and untouched.output_dir == "vipo-default-run"
    assert untouched.save_strategy == "no" and untouched.max_steps == 300


def test_default_run_save_flags_turn_checkpoints_on(tmp_path):
    config = parsed_default(["--save_steps", "50"])
    assert config.save_strategy == "steps" and config.save_steps == 50
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("save_strategy: steps\nsave_steps: 20\nseed: 42\n")
    config = parsed_default(["--config", str(yaml_file)])
    assert config.save_strategy == "steps" and config.save_steps == 20 and config.seed == 42


def test_default_run_refuses_a_resume_path_that_does_not_exist(tmp_path, capsys, no_model_loads):
    line = one_line_error(["train", "--resume_from_checkpoint", str(tmp_path / "nope"), *common(tmp_path)], capsys)
    assert "--resume_from_checkpoint" in line and "no such folder" in line


def test_default_run_resumes_from_latest(tmp_path, capsys, monkeypatch):
    """`--resume_from_checkpoint latest` reaches the trainer of the embedded run (which then skips done steps)."""
    import vipo_trl.default as default

    seen = {}

    def fake_run(config, **kwargs):
        seen["resume"] = config.resume_from_checkpoint

    monkeypatch.setattr(default, "run_default", fake_run)
    (tmp_path / "run" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    main(["train", "--resume_from_checkpoint", "latest", *common(tmp_path)])
    assert seen["resume"] == "latest"


@pytest.mark.parametrize("omp", [None, "2"])
def test_default_run_takes_half_the_cores_unless_omp_num_threads_is_set(tmp_path, capsys, monkeypatch, omp):
    """Beside another busy process, torch's threads on every core wait on each other (up to 5x slower measured): the
    embedded run takes half the cores, and OMP_NUM_THREADS, when the user sets it, wins."""
    import torch

    import vipo_trl.default as default

    seen = {}

    def fake_run(config, **kwargs):
        seen["threads"] = torch.get_num_threads()

    monkeypatch.setattr(default, "run_default", fake_run)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        main(["train", *common(tmp_path)])
    finally:
        torch.set_num_threads(before)
    assert seen["threads"] == (4 if omp is None else 3)
    assert ("4 of 8 CPU threads" in capsys.readouterr().out) == (omp is None)


def test_default_run_trains_the_lora_its_flags_describe(tmp_path, capsys, monkeypatch):
    """TRL's LoRA flags reach the embedded run's LoRA (the ones not given keep the embedded values), and the saved
    LoRA is that one. The run itself is the real one on the shipped model, cut to one step on a few pairs."""
    from PIL import Image
    from safetensors import safe_open

    import vipo_trl.default as default
    from vipo_trl.default import ALL_SCENES, EVAL_SEEDS, make_preference_set

    blank = [Image.new("RGB", (32, 32))] * (len(ALL_SCENES) * len(EVAL_SEEDS))
    monkeypatch.setattr(default, "evaluate_reward", lambda pipe, **kw: (0.5, blank))
    few_pairs = lambda kind, pipe, **kw: make_preference_set(kind, pipe, 2, 2, seed=kw["seed"], scenes=ALL_SCENES[:4])  # noqa: E731
    monkeypatch.setattr(default, "make_preference_set", few_pairs)
    flags = ["--lora_r", "4", "--use_dora", "--lora_target_modules", "to_q", "to_v", "--max_steps", "1"]
    main(["train", *flags, *common(tmp_path), "--per_device_train_batch_size", "2", "--disable_tqdm", "true"])

    with safe_open(str(tmp_path / "run" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys, saved = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert saved["unet.r"] == 4 and saved["unet.lora_alpha"] == default.DEFAULT_LORA["lora_alpha"]
    assert saved["unet.use_dora"] is True and saved["unet.init_lora_weights"] == "gaussian"
    assert any(k.endswith("lora_magnitude_vector") for k in keys)
    assert {k.split(".")[-3] for k in keys if k.endswith("lora_B.weight")} == {"to_q", "to_v"}


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--use_peft", "false"], "the embedded default trains a LoRA"),
        (["--load_in_4bit"], "--load_in_4bit/--load_in_8bit"),
        (["--lora_modules_to_save", "conv_in"], "--lora_modules_to_save=['conv_in']: `load_lora_weights` cannot"),
        (["--lora_r", "0"], "--lora_r=0: the LoRA rank must be a positive integer"),
    ],
)
def test_default_run_refuses_lora_flags_it_cannot_honour(tmp_path, capsys, no_model_loads, flags, expected):
    assert expected in one_line_error(["train", *flags, *common(tmp_path)], capsys)


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing loaded


@pytest.fixture
def data_files(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    pickapic_dataset(4).to_parquet(str(folder / "good.parquet"))
    pickapic_dataset(4).select([]).to_parquet(str(folder / "empty_rows.parquet"))
    (folder / "empty.jsonl").write_text("")
    Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}).save_to_disk(str(folder / "empty_disk"))
    pickapic_dataset(4).remove_columns(["label_1"]).to_parquet(str(folder / "missing_column.parquet"))
    pickapic_dataset(0, ties=4).to_parquet(str(folder / "all_ties.parquet"))
    corrupt = pickapic_dataset(4).to_pandas()
    corrupt["jpg_0"] = [b"not an image"] * 4
    corrupt["jpg_1"] = [b"not an image"] * 4
    Dataset.from_pandas(corrupt).to_parquet(str(folder / "all_corrupt.parquet"))
    return folder


@pytest.mark.parametrize(
    "name, expected",
    [
        ("empty_rows.parquet", "no rows"),
        ("empty.jsonl", "the file is empty"),
        ("empty_disk", "no rows"),
        ("missing_column.parquet", "lacks column(s) ['label_1']"),
        ("all_ties.parquet", "tie"),
        ("all_corrupt.parquet", "unusable"),
        ("no_such_file.parquet", "no such file or folder"),
        ("data/typo", "no such file or folder"),
    ],
)
def test_bad_datasets_fail_before_the_model_loads(
    tmp_path, tiny_sd_path, data_files, capsys, no_model_loads, name, expected
):
    dataset = str(data_files / name) if name != "data/typo" else "./data/typo"
    argv = ["train", "--model_name_or_path", tiny_sd_path, "--dataset_name", dataset, *common(tmp_path)]
    line = one_line_error(argv, capsys)
    assert "--dataset_name" in line and expected in line, line


def test_evaluating_on_a_single_data_file_is_refused(tmp_path, tiny_sd_path, data_files, capsys, no_model_loads):
    # A file has no test split: loading it as one would evaluate on the training rows.
    argv = ["train", "--model_name_or_path", tiny_sd_path, "--dataset_name", str(data_files / "good.parquet")]
    line = one_line_error([*argv, "--eval_strategy", "steps", *common(tmp_path)], capsys)
    assert "no 'test' split" in line and "folder holding train.* and test.*" in line, line


def test_bad_models_fail_with_one_line(tmp_path, tiny_sd_path, data_files, capsys, no_model_loads):
    import shutil

    good = str(data_files / "good.parquet")

    def run(model):
        argv = ["train", "--model_name_or_path", model, "--dataset_name", good, *common(tmp_path)]
        return one_line_error(argv, capsys)

    assert "no such folder" in run(str(tmp_path / "missing-model"))
    (tmp_path / "not-a-pipeline").mkdir()
    assert "no model_index.json" in run(str(tmp_path / "not-a-pipeline"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_path, broken)
    shutil.rmtree(broken / "vae")
    assert "'vae'" in run(str(broken)) and "missing" in run(str(broken))
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_sd_path, pickled)
    for f in (pickled / "unet").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    line = run(str(pickled))
    assert "pickle" in line and "safetensors only" in line


def test_bad_output_dir_and_resume(tmp_path, tiny_sd_path, data_files, capsys, no_model_loads):
    good = str(data_files / "good.parquet")
    base = ["train", "--model_name_or_path", tiny_sd_path, "--dataset_name", good, "--report_to", "none"]
    (tmp_path / "a_file").write_text("x")
    assert "is a file" in one_line_error([*base, "--output_dir", str(tmp_path / "a_file")], capsys)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "poly_dpo_config.json").write_text("{}")
    line = one_line_error([*base, "--output_dir", str(earlier)], capsys)
    assert "holds an earlier run" in line and "--overwrite_output_dir" in line
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    out = ["--output_dir", str(tmp_path / "fresh")]
    line = one_line_error([*base, *out, "--resume_from_checkpoint", str(garbage)], capsys)
    assert "not a complete checkpoint" in line
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": 8})}
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(ckpt / "pytorch_lora_weights.safetensors"), metadata=metadata)
    argv = [*base, *out, "--use_peft", "--lora_r", "4", "--resume_from_checkpoint", str(ckpt)]
    assert "rank 8" in one_line_error(argv, capsys)
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 32, "unet.use_dora": True})}
    save_file({"x": torch.zeros(1)}, str(ckpt / "pytorch_lora_weights.safetensors"), metadata=metadata)
    line = one_line_error(argv, capsys)  # a checkpoint of a DoRA, resumed as a plain LoRA
    assert "its LoRA has use_dora True, this run --use_dora False" in line, line


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--lora_r", "4", "--use_dora"], "--lora_r --use_dora set up a LoRA, but without --use_peft the whole"),
        (["--use_peft", "--lora_modules_to_save", "conv_in"], "--lora_modules_to_save=['conv_in']"),
        (["--use_peft", "--lora_target_parameters", "weight"], "--lora_target_parameters=['weight']"),
    ],
)
def test_lora_flags_that_would_not_train_a_loadable_lora_are_refused(
    tmp_path, tiny_sd_path, data_files, capsys, no_model_loads, flags, expected
):
    data = ["--dataset_name", str(data_files / "good.parquet")]
    line = one_line_error(["train", "--model_name_or_path", tiny_sd_path, *data, *flags, *common(tmp_path)], capsys)
    assert expected in line, line


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size=0"),
        (["--learning_rate", "0"], "learning_rate=0.0"),
    ],
)
def test_bad_numbers_fail_with_one_line(tmp_path, capsys, no_model_loads, flags, expected):
    assert expected in one_line_error(["train", *flags, *common(tmp_path)], capsys)


def test_bad_yaml_fails_with_one_line(tmp_path, capsys, no_model_loads):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("beta: [1, 2\nlearning_rate: 1e-5\n")
    line = one_line_error(["train", "--config", str(yaml_file)], capsys)
    assert "not valid YAML" in line and "bad.yaml" in line
    assert "cannot read" in one_line_error(["train", "--config", str(tmp_path / "missing.yaml")], capsys)


def test_nan_label_is_counted_and_said(caplog):
    import logging

    from vipo_trl.data import DataOptions, pairs_from_options

    rows = pickapic_dataset(4).to_pandas()
    rows.loc[1, "label_0"] = float("nan")
    with caplog.at_level(logging.WARNING):
        pairs = pairs_from_options(Dataset.from_pandas(rows), DataOptions(), 1)
    assert pairs.label_skips == [(1, "bad_label")] and len(pairs) == 3
    assert any("bad labels" in r.getMessage() and "[1]" in r.getMessage() for r in caplog.records)


def test_help_starts_with_the_method(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    head = "\n".join(capsys.readouterr().out.splitlines()[:40])
    for flag in ("--loss_type", "--beta", "--poly_alpha"):
        assert flag in head
    assert os.environ.get("VIPO_TRL_DEBUG") in (None, "", "0")


@pytest.mark.parametrize("command", ["train", "cache", "eval", "pairs", "diagnose"])
def test_shipped_help_is_what_the_parser_renders_now(command, capsys, monkeypatch):
    """`--help` prints a text rendered ahead (no torch import): it must equal what the parser renders now. Rendered
    with other transformers/trl versions than those installed, it is not used and the parser answers itself."""
    from vipo_trl.cli.help import HELP_DIR, cached, render, rendered_with

    header = (HELP_DIR / f"{command}.txt").read_text().partition("\n")[0]
    if header == rendered_with():
        assert cached(command) == render(command), f"stale: run `python -m vipo_trl.cli.help` ({command})"
    else:
        assert cached(command) is None
    monkeypatch.setenv("COLUMNS", "110")  # the width the files are rendered at, for the live parser too
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == render(command)


def test_help_does_not_import_torch():
    import subprocess
    import sys

    from vipo_trl.cli.help import cached

    code = (
        "import sys\nfrom vipo_trl.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    expected = "False" if cached("train") is not None else "True"  # other versions: the live parser (imports torch)
    assert out.strip().splitlines()[-1] == expected
