"""`vipo-trl <command> --help` in well under a second: the parsers' help texts are rendered ahead into files shipped
with the package, because building the `train` parser imports torch, transformers and peft (8-9 s on a small CPU)
only to print text. `python -m vipo_trl.cli.help` rewrites the files; a test fails when one differs from what the
parser renders now, so they cannot drift from the flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

HELP_DIR = Path(__file__).parent / "help_text"
#: The width the texts are rendered at (argparse would otherwise follow the terminal).
WIDTH = 110
COMMANDS_WITH_FLAGS = ("train", "cache", "eval", "pairs", "diagnose")


def parser_for(command: str) -> Any:
    """The argument parser of `vipo-trl <command>` (the one the command itself parses with)."""
    from .parser import (
        CacheArguments,
        DiagnoseArguments,
        EvalArguments,
        PairsArguments,
        TrainArguments,
        VipoArgumentParser,
    )

    if command in ("train", "cache"):
        from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

        from ..trainer import PolyDPOConfig

        middle = [CacheArguments] if command == "cache" else [TrainArguments]
        # As `trl dpo`: a YAML's `datasets:` list (with `streaming`, `test_split_size`) mixes several sets.
        types = [ScriptArguments, ModelConfig, *middle, PolyDPOConfig, DatasetMixtureConfig]
    else:
        types = [{"eval": EvalArguments, "pairs": PairsArguments, "diagnose": DiagnoseArguments}[command]]
    return VipoArgumentParser(types, prog=f"vipo-trl {command}")


def render(command: str) -> str:
    """The help text of `command` as argparse formats it at `WIDTH` columns."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)
    try:
        return parser_for(command).format_help()
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def rendered_with() -> str:
    """The first line of a help file: the versions of the packages whose dataclasses contribute flags (transformers'
    TrainingArguments, trl's ScriptArguments and ModelConfig). Read from package metadata: nothing is imported."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("transformers", "trl"):
        try:
            found.append(f"{package}={version(package)}")
        except PackageNotFoundError:
            found.append(f"{package}=none")
    return "vipo-trl help rendered with " + " ".join(found)


def cached(command: str) -> str | None:
    """The shipped help text of `command`, or `None` when there is none or it was rendered with other versions of
    transformers or trl (the parser then prints its own, slowly but right)."""
    path = HELP_DIR / f"{command}.txt"
    if not path.is_file():
        return None
    header, _, text = path.read_text().partition("\n")
    return text if header == rendered_with() else None


def write_all() -> None:
    HELP_DIR.mkdir(exist_ok=True)
    for command in COMMANDS_WITH_FLAGS:
        (HELP_DIR / f"{command}.txt").write_text(rendered_with() + "\n" + render(command))
        print(f"wrote {HELP_DIR / command}.txt")


if __name__ == "__main__":
    write_all()
