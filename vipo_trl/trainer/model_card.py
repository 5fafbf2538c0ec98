"""The model card written next to a trained LoRA (or denoiser) and pushed with it to the Hub."""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

TAGS = ["vipo-trl", "poly-dpo", "diffusers"]

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

## Use it

```python
{{ snippet }}
```

## Training

| | |
|---|---|
{% for key, value in training.items() %}| {{ key }} | {{ value }} |
{% endfor %}
{% if metrics %}
## Final metrics

| metric | value |
|---|---|
{% for key, value in metrics.items() %}| {{ key }} | {{ value }} |
{% endfor %}
{% endif %}
{% if grid %}
## Samples

Base model (top) and this model (bottom), same prompts and seeds:

![samples]({{ grid }})
{% endif %}
Trained with vipo-trl {{ version }} (`PolyDPOTrainer`).
"""


def loading_snippet(pipeline_class: str, base_model: str, repo_id: str, is_lora: bool, denoiser_name: str) -> str:
    """Code that loads the result into the official diffusers pipeline."""
    if is_lora:
        return (
            f"import torch\nfrom diffusers import {pipeline_class}\n\n"
            f'pipe = {pipeline_class}.from_pretrained("{base_model}", torch_dtype=torch.bfloat16)\n'
            f'pipe.load_lora_weights("{repo_id}")'
        )
    model_class = "UNet2DConditionModel" if denoiser_name == "unet" else "AutoModel"
    return (
        f"import torch\nfrom diffusers import {pipeline_class}, {model_class}\n\n"
        f'{denoiser_name} = {model_class}.from_pretrained("{repo_id}", torch_dtype=torch.bfloat16)\n'
        f'pipe = {pipeline_class}.from_pretrained("{base_model}", {denoiser_name}={denoiser_name}, '
        "torch_dtype=torch.bfloat16)"
    )


def build_model_card(trainer: Any, repo_id: str, dataset_name: str | None = None) -> ModelCard:
    """A `huggingface_hub.ModelCard` describing how `trainer` produced its model."""
    from .._version import __version__

    args, family = trainer.args, trainer.family
    base_model = family.name_or_path or "<base model>"
    pipeline_class = family.pipeline_class.__name__
    tags = [*TAGS, "lora" if trainer.is_lora else "full-fine-tune"]
    tags.append("text-to-video" if family.is_video else "text-to-image")
    card_data = ModelCardData(
        base_model=family.name_or_path,
        datasets=[dataset_name] if dataset_name else None,
        library_name="diffusers",
        pipeline_tag="text-to-video" if family.is_video else "text-to-image",
        tags=tags,
    )
    losses = ", ".join(f"{w} x {name}" for name, w in zip(args.loss_type, args.loss_weights))
    training = {
        "base model": base_model,
        "pipeline": pipeline_class,
        "dataset": dataset_name or "(not recorded)",
        "loss": losses,
        "beta (resolved)": trainer.beta,
        "poly_alpha": args.poly_alpha,
        "method": f"LoRA (r={trainer.lora_rank})" if trainer.is_lora else "full fine-tuning",
        "steps": trainer.state.global_step,
        "learning rate": args.learning_rate,
        "batch (per device x accumulation)": f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps}",
        "resolution": args.resolution,
        "mixed precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "no",
    }
    logged = [h for h in trainer.state.log_history if "loss" in h]
    metrics = {}
    if logged:
        last = logged[-1]
        for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
            if key in last:
                metrics[key] = f"{last[key]:.4g}"
    grid = "samples.png" if os.path.isfile(os.path.join(args.output_dir, "samples.png")) else None
    # A hub id links to its page; a local folder is just named.
    base_ref = (
        f"`{base_model}`" if os.path.exists(base_model) else f"[{base_model}](https://huggingface.co/{base_model})"
    )
    summary = (
        f"A {'LoRA' if trainer.is_lora else 'fine-tuned ' + family.denoiser_name} for {base_ref}, aligned with "
        "human preferences by "
        f"{'Poly-DPO' if 'poly_dpo' in args.loss_type else losses} "
        "(ViPO: Visual Preference Optimization at Scale, ICLR 2026)."
    )
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        model_name=repo_id.split("/")[-1],
        summary=summary,
        snippet=loading_snippet(pipeline_class, base_model, repo_id, trainer.is_lora, family.denoiser_name),
        training=training,
        metrics=metrics,
        grid=grid,
        version=__version__,
    )
