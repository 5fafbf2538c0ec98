"""The supported families as test cases: tiny pipeline, resolution, LoRA targets, a short generation call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vipo_trl.testing import (  # noqa: F401  (re-exported)
    flux_pipeline,
    pickapic_dataset,
    sd3_pipeline,
    sd35_pipeline,
    sd_pipeline,
    sdxl_pipeline,
    video_dataset,
    wan_pipeline,
)


@dataclass
class Family:
    name: str
    build: Any
    resolution: int
    lora_targets: list[str]
    generate_kwargs: dict[str, Any]
    dataset: Any = pickapic_dataset
    config_overrides: dict[str, Any] = field(default_factory=dict)


FAMILIES = [
    Family("sd", sd_pipeline, 16, ["to_q", "to_k", "to_v", "to_out.0"], {"height": 16, "width": 16}),
    Family("sdxl", sdxl_pipeline, 16, ["to_q", "to_k", "to_v", "to_out.0"], {"height": 16, "width": 16}),
    Family(
        "sd3",
        sd3_pipeline,
        8,
        ["to_q", "to_k", "to_v", "to_out.0"],
        {"height": 8, "width": 8},
        config_overrides={"max_sequence_length": 8},
    ),
    Family(
        "sd35",
        sd35_pipeline,
        8,
        ["to_q", "to_k", "to_v", "to_out.0"],
        {"height": 8, "width": 8},
        config_overrides={"max_sequence_length": 8},
    ),
    Family(
        "flux",
        flux_pipeline,
        8,
        ["to_q", "to_k", "to_v", "to_out.0"],
        {"height": 8, "width": 8, "max_sequence_length": 8},
        config_overrides={"max_sequence_length": 8},
    ),
    Family(
        "wan",
        wan_pipeline,
        16,
        ["to_q", "to_k", "to_v", "to_out.0"],
        {"height": 16, "width": 16, "num_frames": 9, "max_sequence_length": 8},
        dataset=video_dataset,
        config_overrides={"max_sequence_length": 8},
    ),
]


def assert_every_lora_b_moved(model, before):
    """After training, every LoRA B matrix (zero at the start) has moved: the loss reached all of them."""
    after = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert after and all(not torch.equal(before[n], p) for n, p in after.items()), [
        n for n, p in after.items() if torch.equal(before[n], p)
    ]


def lora_b(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
