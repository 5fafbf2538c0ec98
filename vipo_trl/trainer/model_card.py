"""The model card written next to a trained LoRA (or denoiser) and pushed with it to the Hub."""

from __future__ import annotations

import json
import os
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from transformers.utils import logging

from ..losses import LOSS_CONFIG_FIELDS

logger = logging.get_logger(__name__)

TAGS = ["vipo-trl", "diffusers"]  # then one tag per method trained with: "poly-dpo", "diffusion-dpo", ...

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

### Framework versions

{% for name, value in versions.items() %}- {{ name }}: {{ value }}
{% endfor %}
## Citations

{% for name, bibtex in citations.items() %}Cite {{ name }} as:

```bibtex
{{ bibtex }}
```

{% endfor %}"""

#: BibTeX of each built-in loss's method (a card cites the losses its run used), and of TRL, whose conventions and
#: parser vipo-trl builds on, as TRL's own cards cite it.
CITATIONS = {
    "poly_dpo": """@inproceedings{vipo2026,
    title     = {{ViPO: Visual Preference Optimization at Scale}},
    author    = {Li and Wu and Cui and Li and Wang and Chen},
    booktitle = {International Conference on Learning Representations (ICLR)},
    year      = {2026},
    eprint    = {2604.24953},
    archivePrefix = {arXiv}
}""",
    "diffusion_dpo": """@inproceedings{wallace2024diffusiondpo,
    title     = {{Diffusion Model Alignment Using Direct Preference Optimization}},
    author    = {Wallace, Bram and Dang, Meihua and Rafailov, Rafael and Zhou, Linqi and Lou, Aaron and
                 Purushwalkam, Senthil and Ermon, Stefano and Xiong, Caiming and Joty, Shafiq and Naik, Nikhil},
    booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
    year      = {2024},
    eprint    = {2311.12908},
    archivePrefix = {arXiv}
}""",
    "mapo": """@misc{hong2024mapo,
    title  = {{Margin-aware Preference Optimization for Aligning Diffusion Models without Reference}},
    author = {Hong, Jiwoo and Paul, Sayak and Lee, Noah and Rasul, Kashif and Thorne, James and Jeong, Jongheon},
    year   = {2024},
    eprint = {2406.06424},
    archivePrefix = {arXiv}
}""",
    "kto": """@inproceedings{li2024diffusionkto,
    title     = {{Aligning Diffusion Models by Optimizing Human Utility}},
    author    = {Li, Shufan and Kallidromitis, Konstantinos and Gokul, Akash and Kato, Yusuke and Kozuka, Kazuki},
    booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
    year      = {2024}
}""",
    "robust": """@inproceedings{chowdhury2024rdpo,
    title     = {{Provably Robust DPO: Aligning Language Models with Noisy Feedback}},
    author    = {Chowdhury, Sayak Ray and Kini, Anush and Natarajan, Nagarajan},
    booktitle = {International Conference on Machine Learning (ICML)},
    year      = {2024},
    eprint    = {2403.00409},
    archivePrefix = {arXiv}
}""",
    "TRL": r"""@misc{vonwerra2022trl,
    title        = {{TRL: Transformer Reinforcement Learning}},
    author       = {Leandro von Werra and Younes Belkada and Lewis Tunstall and Edward Beeching and Tristan Thrush
                    and Nathan Lambert and Shengyi Huang and Kashif Rasul and Quentin Gallou{\'e}dec},
    year         = {2020},
    journal      = {GitHub repository},
    publisher    = {GitHub},
    howpublished = {\url{https://github.com/huggingface/trl}}
}""",
}
CITATIONS["dpo"] = CITATIONS["hinge"] = CITATIONS["ipo"] = CITATIONS["diffusion_dpo"]
METHOD_NAMES = {
    "poly_dpo": "Poly-DPO",
    "diffusion_dpo": "Diffusion-DPO",
    "dpo": "Diffusion-DPO",
    "mapo": "MaPO",
    "kto": "Diffusion-KTO",
    "hinge": "Diffusion-DPO",
    "ipo": "Diffusion-DPO",
    "robust": "Robust DPO",
    "sft": "SFT",
}
#: Methods a loss builds on besides its own: robust DPO's objective over Diffusion-DPO's implicit rewards.
BUILDS_ON = {"robust": ("diffusion_dpo",)}
FRAMEWORKS = ("vipo-trl", "trl", "diffusers", "transformers", "peft", "torch", "datasets")


def framework_versions() -> dict[str, str]:
    """Installed versions of the libraries a run depends on, as TRL's cards list them."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in FRAMEWORKS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def citations(loss_types: list[str]) -> dict[str, str]:
    """Method name -> BibTeX for the losses used (each once), then TRL."""
    out = {}
    for name in loss_types:
        for key in (name, *BUILDS_ON.get(name, ())):
            if key in CITATIONS:
                out.setdefault(METHOD_NAMES.get(key, key), CITATIONS[key])
    out["TRL"] = CITATIONS["TRL"]
    return out


def loading_snippet(
    pipeline_class: str,
    base_model: str,
    repo_id: str,
    is_lora: bool,
    denoiser_name: str,
    fused: list[tuple[str, str]] | None = None,
) -> str:
    """Code that loads the result into the official diffusers pipeline. `fused`: the earlier runs a LoRA run started
    from (`start_from`), rebuilt first: a LoRA fused and unloaded, a fine-tuned denoiser in place of the base's."""
    model_class = "UNet2DConditionModel" if denoiser_name == "unet" else "AutoModel"
    if not is_lora:  # a full fine-tune's denoiser holds whatever it started from
        return (
            f"import torch\nfrom diffusers import {pipeline_class}, {model_class}\n\n"
            f'{denoiser_name} = {model_class}.from_pretrained("{repo_id}", torch_dtype=torch.bfloat16)\n'
            f'pipe = {pipeline_class}.from_pretrained("{base_model}", {denoiser_name}={denoiser_name}, '
            "torch_dtype=torch.bfloat16)"
        )
    fused = fused or []
    imports = f"{pipeline_class}, {model_class}" if any(kind == "denoiser" for _, kind in fused) else pipeline_class
    lines = [f"import torch\nfrom diffusers import {imports}\n"]
    lines.append(f'pipe = {pipeline_class}.from_pretrained("{base_model}", torch_dtype=torch.bfloat16)')
    for weights, kind in fused:  # the model this run started from
        if kind == "lora":
            lines.append(f'pipe.load_lora_weights("{weights}"); pipe.fuse_lora(); pipe.unload_lora_weights()')
        else:
            lines.append(
                f'pipe.{denoiser_name} = {model_class}.from_pretrained("{weights}", torch_dtype=torch.bfloat16)'
            )
    lines.append(f'pipe.load_lora_weights("{repo_id}")')
    return "\n".join(lines)


def _lora_method(config: Any) -> str:
    """`LoRA (r=64, alpha 64)`, or `DoRA (...)`, with rsLoRA's scaling said when used."""
    name = "DoRA" if getattr(config, "use_dora", False) else "LoRA"
    scaling = ", rsLoRA scaling" if getattr(config, "use_rslora", False) else ""
    return f"{name} (r={getattr(config, 'r', None)}, alpha {getattr(config, 'lora_alpha', None)}{scaling})"


def _is_hub_id(name: str | None) -> bool:
    """`name` reads as a Hub repo id (`org/name` or `name`) and is not a local file or folder."""
    import re

    return bool(name) and not os.path.exists(name) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def build_model_card(trainer: Any, repo_id: str, dataset_name: str | list[str] | None = None) -> ModelCard:
    """A `huggingface_hub.ModelCard` describing how `trainer` produced its model; `dataset_name` may list the sets
    of a mixture."""
    from .._version import __version__
    from ..models.generation import published_name

    args, family = trainer.args, trainer.family
    base_model = family.name_or_path or "<base model>"
    # The runs this one started from, by the Hub repo each was pushed to where its folder records one
    started = [(published_name(weights), kind) for weights, kind in family.fused_runs]
    unpublished = [weights for weights, _ in started if os.path.isabs(weights)]
    if unpublished and args.push_to_hub:
        logger.warning(
            "The model card's loading code names %s, the local folder(s) of the run(s) this one started from, which "
            "the card's readers cannot load. Push those runs first (push_to_hub): a card then names their repos.",
            ", ".join(unpublished),
        )
    pipeline_class = family.pipeline_class.__name__
    methods = dict.fromkeys(METHOD_NAMES.get(name, name) for name in args.loss_type)
    tags = [*TAGS, *(m.lower().replace(" ", "-").replace("_", "-") for m in methods)]
    tags.append("lora" if trainer.is_lora else "full-fine-tune")
    tags.append("text-to-video" if family.is_video else "text-to-image")
    names = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name or [])
    # The Hub accepts only repo ids in this metadata (a local folder is named in the card's text instead), as TRL.
    card_data = ModelCardData(
        base_model=family.name_or_path if _is_hub_id(family.name_or_path) else None,
        datasets=[name for name in names if _is_hub_id(name)] or None,
        library_name="diffusers",
        pipeline_tag="text-to-video" if family.is_video else "text-to-image",
        tags=tags,
    )
    losses = ", ".join(f"{w} x {name}" for name, w in zip(args.loss_type, args.loss_weights))
    training = {
        "base model": base_model,
        "pipeline": pipeline_class,
        "dataset": ", ".join(names) or "(not recorded)",
        "loss": losses,
        "beta (resolved)": trainer.beta,
        # The settings of the losses trained with (a Diffusion-DPO run's card shows no poly_alpha)
        **{field: getattr(args, field) for name in args.loss_type for field in LOSS_CONFIG_FIELDS.get(name, ())},
        **({"loss_params": json.dumps(args.loss_params, sort_keys=True)} if args.loss_params else {}),
        **({"started from": ", ".join(w for w, _ in started)} if started else {}),
        "method": _lora_method(trainer.lora_config) if trainer.is_lora else "full fine-tuning",
        "steps": trainer.state.global_step,
        "learning rate": args.learning_rate,
        "batch (per device x accumulation)": f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps}",
        "resolution": args.resolution,
        **({"empty prompts (share of pairs)": args.proportion_empty_prompts} if args.proportion_empty_prompts else {}),
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
    # Named by its method(s); the ViPO paper only for a run that used Poly-DPO.
    source = " (ViPO: Visual Preference Optimization at Scale, ICLR 2026)" if "poly_dpo" in args.loss_type else ""
    summary = (
        f"A {'LoRA' if trainer.is_lora else 'fine-tuned ' + family.denoiser_name} for {base_ref}, aligned with "
        f"human preferences by {', '.join(methods)}{source}."
    )
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        model_name=repo_id.split("/")[-1],
        summary=summary,
        snippet=loading_snippet(pipeline_class, base_model, repo_id, trainer.is_lora, family.denoiser_name, started),
        training=training,
        metrics=metrics,
        grid=grid,
        version=__version__,
        versions=framework_versions(),
        citations=citations(list(args.loss_type)),
    )
