"""mkdocs hook: the command-line reference is generated from the config dataclasses at build time, so it cannot drift
from the code. `<!-- CLI_REFERENCE -->` in a page is replaced by the tables."""

from __future__ import annotations

import dataclasses

PLACEHOLDER = "<!-- CLI_REFERENCE -->"
# trl.ModelConfig flags that mean nothing for a diffusers pipeline (refused or ignored by vipo-trl).
UNUSED_MODEL_FLAGS = {"attn_implementation", "lora_task_type"}


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return f"`{field.default!r}`"
    if field.default_factory is not dataclasses.MISSING:
        return f"`{field.default_factory()!r}`"
    return "required"


def _table(cls, names: list[str], descriptions: dict[str, str]) -> str:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for name in names:
        f = fields[name]
        text = descriptions.get(name) or f.metadata.get("help", "")
        text = " ".join(str(text).split()).replace("|", "\\|")
        rows.append(f"| `--{name}` | {_default(f)} | {text} |")
    return "\n".join(rows)


def cli_reference() -> str:
    from transformers import TrainingArguments
    from trl import ModelConfig, ScriptArguments

    from vipo_trl.cli.parser import CacheArguments, DiagnoseArguments, EvalArguments, PairsArguments
    from vipo_trl.trainer import PolyDPOConfig
    from vipo_trl.trainer.poly_dpo_config import docstring_help

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = [f.name for f in dataclasses.fields(PolyDPOConfig) if f.init and f.name not in inherited]
    overridden = [n for n in ("learning_rate", "logging_steps", "remove_unused_columns") if n in inherited]
    base = [f.name for f in dataclasses.fields(TrainingArguments) if f.init and not f.name.startswith("_")]
    sections = [
        (
            "Data, as `trl.ScriptArguments` names it (`train`, `cache`)",
            ScriptArguments,
            [f.name for f in dataclasses.fields(ScriptArguments) if f.name != "ignore_bias_buffers"],
        ),
        (
            "Model, LoRA and quantization, as `trl.ModelConfig` names them (`train`, `cache`)",
            ModelConfig,
            [f.name for f in dataclasses.fields(ModelConfig) if f.name not in UNUSED_MODEL_FLAGS],
        ),
        ("Latent cache (`cache`)", CacheArguments, [f.name for f in dataclasses.fields(CacheArguments)]),
        ("Evaluation (`eval`)", EvalArguments, [f.name for f in dataclasses.fields(EvalArguments)]),
        ("Making preference pairs (`pairs`)", PairsArguments, [f.name for f in dataclasses.fields(PairsArguments)]),
        (
            "Preference-set diagnosis (`diagnose`)",
            DiagnoseArguments,
            [f.name for f in dataclasses.fields(DiagnoseArguments)],
        ),
        ("PolyDPOConfig", PolyDPOConfig, own + overridden),
        ("Inherited from `transformers.TrainingArguments`", PolyDPOConfig, [n for n in base if n not in overridden]),
    ]
    descriptions = docstring_help(PolyDPOConfig)
    return "\n\n".join(f"### {title}\n\n{_table(cls, names, descriptions)}" for title, cls, names in sections)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if PLACEHOLDER in markdown:
        return markdown.replace(PLACEHOLDER, cli_reference())
    return markdown
