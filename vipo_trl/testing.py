"""Tiny pipelines of every supported family and small preference datasets, built from configs of the real
classes with nothing downloaded: for this library's tests, its examples' `--smoke` runs, and users' own tests.

```python
from vipo_trl.testing import pickapic_dataset, tiny_pipeline

tiny_pipeline("sdxl").save_pretrained("tiny-sdxl")   # then PolyDPOTrainer("tiny-sdxl", ...)
```
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from PIL import Image


def tiny_clip_tokenizer(max_length: int = 16):
    """A character-level CLIP tokenizer (byte-level BPE with no merges): real class, no download."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_sd_components(prediction_type: str = "epsilon", seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=tokenizer.model_max_length,
            vocab_size=len(tokenizer),
        )
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
    }


def save_tiny_sd(path, prediction_type: str = "epsilon") -> str:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_sd_components(prediction_type), requires_safety_checker=False)
    pipe.save_pretrained(path)
    return str(path)


def png_bytes(color, size=(20, 16)) -> bytes:
    rng = np.random.default_rng(sum(color))
    array = np.clip(np.array(color, dtype=np.float32) + rng.normal(0, 10, (size[1], size[0], 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def pickapic_dataset(n: int = 8, ties: int = 0) -> Dataset:
    """Rows in Pick-a-Pic v2's schema: the red image always wins, on either side; `ties` extra tied rows."""
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    red, blue = png_bytes((220, 30, 30)), png_bytes((30, 30, 220))
    for i in range(n + ties):
        red_first = i % 2 == 0
        rows["caption"].append(f"a red square {i}")
        rows["jpg_0"].append(red if red_first else blue)
        rows["jpg_1"].append(blue if red_first else red)
        tie = i >= n
        rows["label_0"].append(0.5 if tie else float(red_first))
        rows["label_1"].append(0.5 if tie else float(not red_first))
    return Dataset.from_dict(rows)


def tiny_t5_tokenizer():
    """A T5 (Unigram) tokenizer over lowercase letters and digits: real class, no download."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab += [(ch, -3.0), ("\u2581" + ch, -3.5)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=16)


def tiny_t5_encoder(umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=80, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, relative_attention_num_buckets=8
    )
    return model_cls(config)


def clip_text_config(**kw):
    from transformers import CLIPTextConfig

    base = dict(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=16,
        vocab_size=len(tiny_clip_tokenizer()),
        projection_dim=32,
    )
    base.update(kw)
    return CLIPTextConfig(**base)


def sdxl_pipeline():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + 32 pooled
        cross_attention_dim=64,
        norm_num_groups=4,
    )
    sd = tiny_sd_components()
    return StableDiffusionXLPipeline(
        vae=sd["vae"],
        text_encoder=CLIPTextModel(clip_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config()),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        add_watermarker=False,
    )


def tiny_flow_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def sd3_pipeline(with_t5: bool = True):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_flow_vae(4),
        text_encoder=CLIPTextModelWithProjection(clip_text_config()),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config()),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder() if with_t5 else None,
        tokenizer_3=tiny_t5_tokenizer() if with_t5 else None,
    )


def sd35_pipeline():
    """SD3.5's transformer variant (Medium: RMS-normalised queries and keys, a second self-attention in the first
    layers), otherwise as `sd3_pipeline`."""
    from diffusers import SD3Transformer2DModel

    pipe = sd3_pipeline()
    torch.manual_seed(0)
    pipe.transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    )
    return pipe


def flux_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_flow_vae(1),
        text_encoder=CLIPTextModel(clip_text_config()),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(),
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )


def wan_pipeline():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    return WanPipeline(
        tokenizer=tiny_t5_tokenizer(),
        text_encoder=tiny_t5_encoder(umt5=True),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=transformer,
    )


def video_dataset(n: int = 4, frames: int = 9, size: int = 16) -> Dataset:
    """Generic-schema video pairs: frames as PNG bytes; the red clip wins."""
    red = [png_bytes((200 + i, 30, 30), (size, size)) for i in range(frames)]
    blue = [png_bytes((30, 30, 200 + i), (size, size)) for i in range(frames)]
    return Dataset.from_dict(
        {"prompt": [f"a red clip {i}" for i in range(n)], "chosen": [red] * n, "rejected": [blue] * n}
    )


def sd_pipeline(prediction_type: str = "epsilon"):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**tiny_sd_components(prediction_type), requires_safety_checker=False)


TINY_PIPELINES = {
    "sd": sd_pipeline,
    "sdxl": sdxl_pipeline,
    "sd3": sd3_pipeline,
    "sd35": sd35_pipeline,
    "flux": flux_pipeline,
    "wan": wan_pipeline,
}


def tiny_pipeline(family: str) -> Any:
    """A tiny pipeline of `family` ("sd", "sdxl", "sd3", "sd35", "flux" or "wan") with random weights."""
    try:
        return TINY_PIPELINES[family]()
    except KeyError:
        raise ValueError(f"Unknown family {family!r}; choose from {sorted(TINY_PIPELINES)}.") from None


def save_tiny_vlm(path) -> str:
    """A tiny random LLaVA (CLIP vision tower, Llama text model) with a word-level tokenizer and a chat template,
    saved with `save_pretrained` so `AutoProcessor`/`AutoModelForImageTextToText` load it as they would a hub model."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    symbols = string.ascii_letters + string.digits + ":.,?\"'-"
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<image>", *symbols])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split("", behavior="isolated")]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = (
        "{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the vision tower's CLS token, which "default" then drops
        chat_template=template,
    )
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
            patch_size=4, projection_dim=16,
        ),
        text_config=LlamaConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
        ),
        image_token_index=vocab["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )  # fmt: skip
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)
