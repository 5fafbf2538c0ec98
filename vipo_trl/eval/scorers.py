"""Reward scorers behind one interface: `scorer.score(images, prompts) -> tensor` of one score per (image, prompt).

Built in (`available_scorers()`), all on transformers, loading published weights by hub id:

* `clip`: CLIP ViT-L/14 (`openai/clip-vit-large-patch14`); 100 * max(cos(image, text), 0).
* `pickscore`: PickScore v1 (`yuvalkirstain/PickScore_v1`, processor `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`);
  the model's logit scale * cos.
* `hpsv2`: HPSv2.1 (`xswu/HPSv2`, file `HPS_v2.1_compressed.pt`: an open_clip ViT-H-14, converted here); 100 * cos.
* `imagereward`: ImageReward v1.0 (`THUDM/ImageReward`, file `ImageReward.pt`: BLIP, converted here); MLP head,
  normalised by the published mean and std.
* `aesthetic`: LAION aesthetic predictor v2 (`camenduru/improved-aesthetic-predictor`) on CLIP ViT-L/14 image
  embeddings; about 1-10.
* `shapes`: the embedded default's programmatic reward (no weights); share of attributes right.
* `vlm_judge`: a vision-language model comparing two images (`judge.VLMJudge`; pairwise, for `make_pairs`).
* `temporal_consistency`: mean CLIP similarity of consecutive video frames (`video_scorers`); every image scorer
  also scores videos through `video_scorers.FrameAveragedScorer`.

Each scorer also takes the folder or hub id of weights in the same layout (tests pass tiny random models). `.pt`
checkpoints are read with `torch.load(weights_only=True)`: tensors only, never arbitrary pickled objects.
Register your own with `@register_scorer("name")` on a `RewardScorer` subclass or a factory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from ..utils import Registry

_SCORERS: Registry[Callable[..., RewardScorer]] = Registry("scorer")


class RewardScorer:
    """Scores images against their prompts, in batches, on any device. Subclasses implement `_score_batch`.

    Args:
        device: where the scorer's network runs (default: CUDA when available).
        dtype: the network's dtype (default float32).
        batch_size: images scored per forward pass.
    """

    name = "scorer"
    #: True when a higher score means a better image (every built-in scorer).
    higher_is_better = True

    def __init__(
        self, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32, batch_size: int = 16
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """One float32 score per (image, prompt), on the CPU."""
        if len(images) != len(prompts):
            raise ValueError(
                f"{self.name}: got {len(images)} images for {len(prompts)} prompts; pass one prompt per image."
            )
        scores = [
            self._score_batch(list(images[i : i + self.batch_size]), list(prompts[i : i + self.batch_size]))
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(scores).float().cpu() if scores else torch.zeros(0)

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device})"


def register_scorer(name: str, override: bool = False) -> Callable:
    """Register a scorer class or factory under `name` (used by `get_scorer`, `vipo-trl eval` and `diagnose`)."""

    def wrap(factory: Callable[..., RewardScorer]) -> Callable[..., RewardScorer]:
        return _SCORERS.register(name, factory, override=override)

    return wrap


def available_scorers() -> list[str]:
    return _SCORERS.names()


class ScorerUnavailable(OSError):
    """A scorer's weights could not be loaded (no network, no access, a mistyped `model=`); the message names the
    scorer, the hub ids it reads and how to get them."""


def get_scorer(name: str, **kwargs: Any) -> RewardScorer:
    """A scorer by name; keyword arguments go to its constructor (e.g. `model=`, `device=`, `batch_size=`). Raises
    `ScorerUnavailable` when its weights cannot be read."""
    # (the judge and the video scorers register when `vipo_trl.eval` is imported, which importing this module does)
    factory = _SCORERS.get(name)
    try:
        scorer = factory(**kwargs)
    except OSError as exc:  # transformers/huggingface_hub report a missing or unreachable repo as an OSError
        sources = _weight_sources(factory, kwargs)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fix = (
            f"download {', '.join(sources)} once where the Hub is reachable (`hf download <id>`; kept in the Hugging "
            "Face cache, then HF_HUB_OFFLINE=1 works), or in Python pass local folders (`get_scorer(name, model=...)`)"
            if sources
            else "check the scorer's weights"
        )
        raise ScorerUnavailable(f"scorer {name!r}: cannot load its weights ({reason}); {fix}.") from exc
    scorer.name = name
    return scorer


def _weight_sources(factory: Callable[..., RewardScorer], kwargs: dict[str, Any]) -> list[str]:
    """The hub ids or folders a scorer reads: its string arguments that name a repo or a path (given or default)."""
    import inspect
    import os

    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return []
    values = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    values.update(kwargs)
    names = [v for k, v in values.items() if k in ("model", "processor", "base", "clip") and isinstance(v, str)]
    return list(dict.fromkeys(v for v in names if "/" in v or os.path.isdir(v)))


def _rgb(images: list[Image.Image]) -> list[Image.Image]:
    return [image.convert("RGB") for image in images]


def _centre_square(image: Image.Image) -> Image.Image:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


# ---------------------------------------------------------------------------------------------- CLIP family


class CLIPSimilarityScorer(RewardScorer):
    """Cosine similarity of CLIP image and text embeddings, times `scale` ("logit": the model's own logit scale, as
    PickScore; a number: that constant), optionally clamped at 0 (CLIP score)."""

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        scale: float | str = 100.0,
        clamp_at_zero: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(model).to(self.device, self.dtype).eval()
        self.processor = CLIPProcessor.from_pretrained(processor or model)
        self.scale, self.clamp_at_zero = scale, clamp_at_zero

    def _features(self, images: list[Image.Image], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.processor(
            text=prompts, images=_rgb(images), return_tensors="pt", padding=True, truncation=True
        ).to(self.device)
        image = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.dtype))
        text = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image, text = _pooled(image), _pooled(text)
        return torch.nn.functional.normalize(image.float(), dim=-1), torch.nn.functional.normalize(text.float(), dim=-1)

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        image, text = self._features(images, prompts)
        cosine = (image * text).sum(-1)
        if self.clamp_at_zero:
            cosine = cosine.clamp(min=0)
        scale = self.model.logit_scale.exp().float() if self.scale == "logit" else self.scale
        return scale * cosine


def _pooled(features: Any) -> torch.Tensor:
    # transformers returns a tensor, or (in some versions) an output object holding the projected embeddings.
    if isinstance(features, torch.Tensor):
        return features
    return features.pooler_output


@register_scorer("clip")
def clip_scorer(model: str = "openai/clip-vit-large-patch14", **kwargs: Any) -> RewardScorer:
    return CLIPSimilarityScorer(model, scale=100.0, clamp_at_zero=True, **kwargs)


@register_scorer("pickscore")
def pickscore_scorer(
    model: str = "yuvalkirstain/PickScore_v1", processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", **kwargs: Any
) -> RewardScorer:
    # Tests pass a tiny model folder that holds its own processor.
    import os

    if os.path.isdir(model) and processor == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K":
        processor = model
    return CLIPSimilarityScorer(model, processor=processor, scale="logit", clamp_at_zero=False, **kwargs)


@register_scorer("hpsv2")
class HPSv2Scorer(CLIPSimilarityScorer):
    """HPSv2.1: an open_clip ViT-H-14 fine-tuned on human preferences; score = 100 * cos(image, text).

    Its weights are published as an open_clip checkpoint; they are loaded with `torch.load(weights_only=True)` and
    converted to transformers' `CLIPModel` (`convert_open_clip_state_dict`) on the architecture of `base`.
    """

    def __init__(
        self,
        model: str = "xswu/HPSv2",
        checkpoint: str = "HPS_v2.1_compressed.pt",
        base: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        **kwargs: Any,
    ):
        RewardScorer.__init__(self, **kwargs)
        from transformers import CLIPConfig, CLIPModel, CLIPProcessor

        state = _load_torch_checkpoint(model, checkpoint)
        clip = CLIPModel(CLIPConfig.from_pretrained(base))
        _load_converted(clip, convert_open_clip_state_dict(state, clip.config), "HPSv2.1")
        self.model = clip.to(self.device, self.dtype).eval()
        self.processor = CLIPProcessor.from_pretrained(base)
        self.scale, self.clamp_at_zero = 100.0, False


def convert_open_clip_state_dict(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (OpenAI layout: `visual.*`, `transformer.resblocks.*`, `ln_final`, ...) as the
    keys of transformers' `CLIPModel`."""
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    out = {
        "logit_scale": state["logit_scale"],
        "text_projection.weight": state["text_projection"].t(),
        "visual_projection.weight": state["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
    }
    towers = [
        ("transformer.resblocks", "text_model.encoder.layers", config.text_config.num_hidden_layers),
        ("visual.transformer.resblocks", "vision_model.encoder.layers", config.vision_config.num_hidden_layers),
    ]
    for source, target, layers in towers:
        for i in range(layers):
            s, t = f"{source}.{i}", f"{target}.{i}"
            for kind in ("weight", "bias"):
                q, k, v = state[f"{s}.attn.in_proj_{kind}"].chunk(3)
                out[f"{t}.self_attn.q_proj.{kind}"] = q
                out[f"{t}.self_attn.k_proj.{kind}"] = k
                out[f"{t}.self_attn.v_proj.{kind}"] = v
                for a, b in (
                    ("attn.out_proj", "self_attn.out_proj"),
                    ("ln_1", "layer_norm1"),
                    ("ln_2", "layer_norm2"),
                    ("mlp.c_fc", "mlp.fc1"),
                    ("mlp.c_proj", "mlp.fc2"),
                ):
                    out[f"{t}.{b}.{kind}"] = state[f"{s}.{a}.{kind}"]
    return out


# ---------------------------------------------------------------------------------------------- ImageReward


@register_scorer("imagereward")
class ImageRewardScorer(RewardScorer):
    """ImageReward v1.0: BLIP (ViT-L/16 image encoder, BERT text encoder with cross-attention to the image) and an
    MLP head on the text encoder's first token, normalised by the published mean and std.

    Its weights are a checkpoint of the authors' BLIP code; they are loaded with `torch.load(weights_only=True)` and
    converted to transformers' `BlipForImageTextRetrieval` (`convert_imagereward_state_dict`) on the architecture
    of `base` (image size 224, as ImageReward).
    """

    MEAN, STD = 0.16717362830052426, 1.0333394966054072

    def __init__(
        self,
        model: str = "THUDM/ImageReward",
        checkpoint: str = "ImageReward.pt",
        base: str = "Salesforce/blip-itm-large-coco",
        image_size: int = 224,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        from transformers import BlipConfig, BlipForImageTextRetrieval, BlipProcessor

        config = BlipConfig.from_pretrained(base)
        config.vision_config.image_size = image_size
        state = _load_torch_checkpoint(model, checkpoint)
        blip = BlipForImageTextRetrieval(config)
        self.head = _mlp_head(config.text_config.hidden_size)
        converted = convert_imagereward_state_dict(state, config)
        head = {k.removeprefix("mlp."): v for k, v in converted.items() if k.startswith("mlp.")}
        body = {k: v for k, v in converted.items() if not k.startswith("mlp.")}
        _load_converted(blip, body, "ImageReward", required=("vision_model.", "text_encoder."))
        self.head.load_state_dict(head)
        self.vision = blip.vision_model.to(self.device, self.dtype).eval()
        self.text = blip.text_encoder.to(self.device, self.dtype).eval()
        self.head = self.head.to(self.device, self.dtype).eval()
        self.processor = BlipProcessor.from_pretrained(base)
        self.image_size = image_size

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        size = {"height": self.image_size, "width": self.image_size}
        # ImageReward resizes the short side and centre-crops; BLIP's processor would squash a non-square image.
        squares = [_centre_square(image) for image in _rgb(images)]
        pixels = self.processor.image_processor(squares, size=size, return_tensors="pt").pixel_values
        text = self.processor.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
        )
        image_embeds = self.vision(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state
        hidden = self.text(
            input_ids=text.input_ids.to(self.device),
            attention_mask=text.attention_mask.to(self.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long, device=self.device),
        ).last_hidden_state[:, 0]
        return ((self.head(hidden).squeeze(-1).float()) - self.MEAN) / self.STD


def convert_imagereward_state_dict(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """The authors' ImageReward checkpoint (`blip.visual_encoder.*` timm-style ViT, `blip.text_encoder.*` BERT,
    `mlp.layers.*`) as keys of transformers' `BlipForImageTextRetrieval` (text encoder keys are BERT's in both) plus
    `mlp.*` for the head."""
    state = state.get("state_dict", state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("mlp."):
            out[key.replace("mlp.layers.", "mlp.")] = value
        elif key.startswith("blip.text_encoder."):
            if ".pooler." not in key:
                out["text_encoder." + key.removeprefix("blip.text_encoder.")] = value
    vit = "blip.visual_encoder"
    out["vision_model.embeddings.class_embedding"] = state[f"{vit}.cls_token"]
    out["vision_model.embeddings.position_embedding"] = state[f"{vit}.pos_embed"]
    out["vision_model.embeddings.patch_embedding.weight"] = state[f"{vit}.patch_embed.proj.weight"]
    out["vision_model.embeddings.patch_embedding.bias"] = state[f"{vit}.patch_embed.proj.bias"]
    out["vision_model.post_layernorm.weight"] = state[f"{vit}.norm.weight"]
    out["vision_model.post_layernorm.bias"] = state[f"{vit}.norm.bias"]
    for i in range(config.vision_config.num_hidden_layers):
        s, t = f"{vit}.blocks.{i}", f"vision_model.encoder.layers.{i}"
        for kind in ("weight", "bias"):
            for a, b in (
                ("norm1", "layer_norm1"),
                ("attn.qkv", "self_attn.qkv"),
                ("attn.proj", "self_attn.projection"),
                ("norm2", "layer_norm2"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
            ):
                out[f"{t}.{b}.{kind}"] = state[f"{s}.{a}.{kind}"]
    return out


# ---------------------------------------------------------------------------------------------- aesthetic


def _mlp_head(width: int) -> torch.nn.Sequential:
    """The MLP head shared by the LAION aesthetic predictor v2 and ImageReward (layers 0, 2, 4, 6, 7 hold weights)."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(width, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


@register_scorer("aesthetic")
class AestheticScorer(RewardScorer):
    """LAION aesthetic predictor v2: an MLP on the L2-normalised CLIP ViT-L/14 image embedding (prompt ignored)."""

    def __init__(
        self,
        model: str = "camenduru/improved-aesthetic-predictor",
        checkpoint: str = "sac+logos+ava1-l14-linearMSE.pth",
        clip: str = "openai/clip-vit-large-patch14",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.clip = CLIPVisionModelWithProjection.from_pretrained(clip).to(self.device, self.dtype).eval()
        self.processor = CLIPImageProcessor.from_pretrained(clip)
        state = _load_torch_checkpoint(model, checkpoint)
        self.head = _mlp_head(self.clip.config.projection_dim)
        self.head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
        self.head = self.head.to(self.device, self.dtype).eval()

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = self.processor(_rgb(images), return_tensors="pt").pixel_values.to(self.device, self.dtype)
        embeds = self.clip(pixel_values=pixels).image_embeds
        return self.head(torch.nn.functional.normalize(embeds.float(), dim=-1).to(self.dtype)).squeeze(-1)


# ---------------------------------------------------------------------------------------------- programmatic


@register_scorer("shapes")
class ShapesScorer(RewardScorer):
    """The embedded default's programmatic reward: share of colour, shape and position read back right (0-1)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**{"device": "cpu", **kwargs})

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        from ..default.shapes import reward

        return torch.tensor([reward(image, prompt) for image, prompt in zip(images, prompts)])


# ---------------------------------------------------------------------------------------------- loading


def _load_torch_checkpoint(model: str, filename: str) -> dict[str, torch.Tensor]:
    """Tensors of a `.pt`/`.pth`/`.safetensors` file in a local folder or hub repo; pickles only as weights."""
    import os

    path = os.path.join(model, filename) if os.path.isdir(model) else None
    if path is None:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(model, filename)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickler refusal: say what the file is, not a deep pickle error
        raise ValueError(
            f"{path} is not a plain tensor checkpoint ({type(exc).__name__}: {exc}). vipo-trl loads .pt files with "
            "weights_only=True only; convert it to safetensors with code you trust."
        ) from None


def _load_converted(
    module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, required: tuple[str, ...] = ("",)
) -> None:
    """Load `state` into `module`; every key under a `required` prefix must be filled, and nothing left over."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k and k.startswith(required)]
    unexpected = [k for k in unexpected if "position_ids" not in k]
    if missing or unexpected:
        raise ValueError(
            f"the {what} checkpoint does not fit its architecture: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
