"""Evaluation: scorers on tiny random models (no downloads), checkpoint conversion, win rates, diagnose, eval."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from torch import nn

from vipo_trl.default import ALL_SCENES, Scene, render
from vipo_trl.eval import (
    RewardScorer,
    available_scorers,
    convert_imagereward_state_dict,
    diagnose,
    evaluate_alignment,
    get_scorer,
    register_scorer,
    suggest_alpha,
    summarize,
    win_rate,
)
from vipo_trl.models.generation import CAPTION_HEIGHT, LABEL_WIDTH
from vipo_trl.testing import tiny_clip_tokenizer

WIDTH, LAYERS, HEADS, EMBED, IMAGE, PATCH = 32, 2, 4, 16, 30, 6


def tiny_clip(path):
    """A random CLIP model and its processor, saved like a hub checkpoint."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer(max_length=16)
    tower = dict(
        hidden_size=WIDTH,
        intermediate_size=37,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        projection_dim=EMBED,
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_act="gelu",
            **tower,
        ),
        vision_config=dict(image_size=IMAGE, patch_size=PATCH, hidden_act="gelu", **tower),
        projection_dim=EMBED,
    )
    CLIPModel(config).save_pretrained(path)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(path)
    return str(path)


def pictures(n=5):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


PROMPTS = ["a red cat", "a dog", "blue sky", "a red cat", "two trees"]


def test_clip_and_pickscore_match_a_hand_computation_and_batching(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    folder = tiny_clip(tmp_path / "clip")
    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=PROMPTS, images=pictures(), return_tensors="pt", padding=True)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    cosine = nn.functional.cosine_similarity(image, text)

    clip = get_scorer("clip", model=folder, device="cpu", batch_size=2)
    torch.testing.assert_close(clip.score(pictures(), PROMPTS), 100 * cosine.clamp(min=0), atol=1e-4, rtol=1e-4)
    pick = get_scorer("pickscore", model=folder, device="cpu", batch_size=16)
    expected = model.logit_scale.exp().item() * cosine
    torch.testing.assert_close(pick.score(pictures(), PROMPTS), expected, atol=1e-4, rtol=1e-4)
    # Batching does not change a score.
    pick2 = get_scorer("pickscore", model=folder, device="cpu", batch_size=2)
    torch.testing.assert_close(pick2.score(pictures(), PROMPTS), pick.score(pictures(), PROMPTS), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip.score(pictures(2), PROMPTS)


class OpenClipLayout(nn.Module):
    """A CLIP written the way open_clip names its parameters (the HPSv2.1 checkpoint's layout), with its own forward:
    the reference the converted transformers model must reproduce."""

    def __init__(self, vocab: int, context: int):
        super().__init__()

        def blocks():
            return nn.ModuleDict(
                {
                    "resblocks": nn.ModuleList(
                        nn.ModuleDict(
                            {
                                "ln_1": nn.LayerNorm(WIDTH),
                                "attn": nn.MultiheadAttention(WIDTH, HEADS, batch_first=True),
                                "ln_2": nn.LayerNorm(WIDTH),
                                "mlp": nn.ModuleDict({"c_fc": nn.Linear(WIDTH, 37), "c_proj": nn.Linear(37, WIDTH)}),
                            }
                        )
                        for _ in range(LAYERS)
                    )
                }
            )

        self.token_embedding = nn.Embedding(vocab, WIDTH)
        self.positional_embedding = nn.Parameter(torch.randn(context, WIDTH) * 0.1)
        self.transformer = blocks()
        self.ln_final = nn.LayerNorm(WIDTH)
        self.text_projection = nn.Parameter(torch.randn(WIDTH, EMBED) * 0.2)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        grid = (IMAGE // PATCH) ** 2
        self.visual = nn.Module()
        self.visual.conv1 = nn.Conv2d(3, WIDTH, PATCH, PATCH, bias=False)
        self.visual.class_embedding = nn.Parameter(torch.randn(WIDTH) * 0.1)
        self.visual.positional_embedding = nn.Parameter(torch.randn(grid + 1, WIDTH) * 0.1)
        self.visual.ln_pre = nn.LayerNorm(WIDTH)
        self.visual.transformer = blocks()
        self.visual.ln_post = nn.LayerNorm(WIDTH)
        self.visual.proj = nn.Parameter(torch.randn(WIDTH, EMBED) * 0.2)
        for p in self.parameters():  # random layer norms too, so a swapped norm would show
            if p.dim() == 1 and p.shape[0] == WIDTH:
                p.data.normal_(1.0, 0.1)

    @staticmethod
    def _run(tower, x, mask=None):
        for block in tower["resblocks"]:
            h = block["ln_1"](x)
            x = x + block["attn"](h, h, h, attn_mask=mask, need_weights=False)[0]
            h = block["ln_2"](x)
            x = x + block["mlp"]["c_proj"](nn.functional.gelu(block["mlp"]["c_fc"](h)))
        return x

    def encode_text(self, ids, eos_id):
        n = ids.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1)
        x = self._run(self.transformer, self.token_embedding(ids) + self.positional_embedding[:n], mask)
        x = self.ln_final(x)
        eos = (ids == eos_id).int().argmax(dim=-1)  # the first end-of-text token
        return x[torch.arange(len(ids)), eos] @ self.text_projection

    def encode_image(self, pixels):
        v = self.visual
        x = v.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(len(x), 1, -1), x], dim=1) + v.positional_embedding
        x = self._run(v.transformer, v.ln_pre(x))
        return v.ln_post(x[:, 0]) @ v.proj


def test_hpsv2_converts_an_open_clip_checkpoint_exactly(tmp_path):
    from transformers import CLIPProcessor

    base = tiny_clip(tmp_path / "base")  # the architecture (config) and processor HPSv2.1 is built on
    tokenizer = tiny_clip_tokenizer(max_length=16)
    torch.manual_seed(1)
    reference = OpenClipLayout(len(tokenizer), 16).eval()
    (tmp_path / "hps").mkdir()
    torch.save({"epoch": 1, "state_dict": reference.state_dict()}, tmp_path / "hps" / "hps.pt")

    scorer = get_scorer("hpsv2", model=str(tmp_path / "hps"), checkpoint="hps.pt", base=base, device="cpu")
    inputs = CLIPProcessor.from_pretrained(base)(text=PROMPTS, images=pictures(), return_tensors="pt", padding=True)
    with torch.no_grad():
        image = reference.encode_image(inputs["pixel_values"])
        text = reference.encode_text(inputs["input_ids"], eos_id=1)
    expected = 100 * nn.functional.cosine_similarity(image, text)
    torch.testing.assert_close(scorer.score(pictures(), PROMPTS), expected, atol=1e-4, rtol=1e-4)


def test_a_checkpoint_that_is_not_plain_tensors_is_refused(tmp_path):
    base = tiny_clip(tmp_path / "base")
    (tmp_path / "bad").mkdir()
    torch.save({"state_dict": {}, "opts": ExoticObject()}, tmp_path / "bad" / "hps.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        get_scorer("hpsv2", model=str(tmp_path / "bad"), checkpoint="hps.pt", base=base, device="cpu")


class ExoticObject:
    pass


def published_head(width):
    """The MLP head as the ImageReward and LAION aesthetic authors define it (weights at layers 0, 2, 4, 6, 7)."""
    layers = [nn.Linear(width, 1024), nn.Dropout(), nn.Linear(1024, 128), nn.Dropout(), nn.Linear(128, 64)]
    return nn.Sequential(*layers, nn.Dropout(), nn.Linear(64, 16), nn.Linear(16, 1)).eval()


def tiny_blip(path):
    from transformers import BertTokenizer, BlipConfig, BlipImageProcessor, BlipProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "dog", "blue", "sky", "two", "trees"]
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(path / "vocab.txt"))
    config = BlipConfig(
        vision_config=dict(
            hidden_size=WIDTH,
            intermediate_size=37,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            image_size=32,
            patch_size=16,
        ),
        text_config=dict(
            vocab_size=len(words),
            hidden_size=WIDTH,
            intermediate_size=37,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            encoder_hidden_size=WIDTH,
            max_position_embeddings=40,
        ),
    )
    config.save_pretrained(path)
    BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    ).save_pretrained(path)
    return config


def test_imagereward_loads_the_authors_layout_and_scores_like_its_forward(tmp_path):
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    config = tiny_blip(tmp_path / "blip")
    torch.manual_seed(2)
    blip = BlipForImageTextRetrieval(config).eval()
    head = published_head(WIDTH)
    # The authors' checkpoint layout: timm-style ViT under blip.visual_encoder, BERT under blip.text_encoder.
    state = {f"mlp.layers.{k}": v for k, v in head.state_dict().items()}
    vit = "blip.visual_encoder"
    own = blip.state_dict()
    state[f"{vit}.cls_token"] = own["vision_model.embeddings.class_embedding"]
    state[f"{vit}.pos_embed"] = own["vision_model.embeddings.position_embedding"]
    state[f"{vit}.patch_embed.proj.weight"] = own["vision_model.embeddings.patch_embedding.weight"]
    state[f"{vit}.patch_embed.proj.bias"] = own["vision_model.embeddings.patch_embedding.bias"]
    state[f"{vit}.norm.weight"] = own["vision_model.post_layernorm.weight"]
    state[f"{vit}.norm.bias"] = own["vision_model.post_layernorm.bias"]
    names = {
        "layer_norm1": "norm1",
        "self_attn.qkv": "attn.qkv",
        "self_attn.projection": "attn.proj",
        "layer_norm2": "norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for key, value in own.items():
        if key.startswith("vision_model.encoder.layers."):
            i, rest = key.removeprefix("vision_model.encoder.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            state[f"{vit}.blocks.{i}.{names[module]}.{kind}"] = value
        elif key.startswith("text_encoder."):
            state["blip." + key] = value
    state["blip.text_proj.weight"] = torch.zeros(4, WIDTH)  # parts ImageReward does not use are ignored
    (tmp_path / "ir").mkdir()
    torch.save(state, tmp_path / "ir" / "ImageReward.pt")
    assert set(convert_imagereward_state_dict(state, config)) >= {"vision_model.post_layernorm.weight", "mlp.0.weight"}

    scorer = get_scorer(
        "imagereward",
        model=str(tmp_path / "ir"),
        base=str(tmp_path / "blip"),
        image_size=32,
        device="cpu",
        batch_size=2,
    )
    processor = BlipProcessor.from_pretrained(tmp_path / "blip")
    pixels = processor.image_processor(pictures(), return_tensors="pt").pixel_values
    text = processor.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        image_embeds = blip.vision_model(pixel_values=pixels).last_hidden_state
        hidden = blip.text_encoder(
            input_ids=text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds
        ).last_hidden_state[:, 0]
        expected = (head(hidden).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(scorer.score(pictures(), PROMPTS), expected, atol=1e-4, rtol=1e-4)


def test_aesthetic_is_its_head_on_normalised_clip_embeddings(tmp_path):
    from transformers import CLIPModel

    folder = tiny_clip(tmp_path / "clip")
    torch.manual_seed(3)
    head = published_head(EMBED)
    (tmp_path / "head").mkdir()
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, tmp_path / "head" / "aesthetic.pth")
    scorer = get_scorer(
        "aesthetic", model=str(tmp_path / "head"), checkpoint="aesthetic.pth", clip=folder, device="cpu"
    )
    from transformers import CLIPImageProcessor

    pixels = CLIPImageProcessor.from_pretrained(folder)(pictures(), return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = CLIPModel.from_pretrained(folder).get_image_features(pixel_values=pixels)
        embeds = getattr(embeds, "pooler_output", embeds)
        expected = head(nn.functional.normalize(embeds, dim=-1)).squeeze(-1)
    torch.testing.assert_close(scorer.score(pictures(), ["ignored"] * 5), expected, atol=1e-4, rtol=1e-4)


def test_scorer_registry():
    assert {"clip", "pickscore", "hpsv2", "imagereward", "aesthetic", "shapes"} <= set(available_scorers())

    @register_scorer("brightness-test")
    class Brightness(RewardScorer):
        def _score_batch(self, images, prompts):
            return torch.tensor([np.asarray(im, np.float32).mean() / 255 for im in images])

    scores = get_scorer("brightness-test", device="cpu").score(
        [Image.new("RGB", (4, 4), "white"), Image.new("RGB", (4, 4), "black")], ["x", "y"]
    )
    assert scores.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("brightness-test")(Brightness)
    with pytest.raises(ValueError, match="Did you mean 'pickscore'"):
        get_scorer("pickscor")
    shapes = get_scorer("shapes")
    scene = Scene("red", "circle", "left")
    assert shapes.score([render(scene)], [scene.prompt]).tolist() == [1.0]


def test_mean_interval_and_t_quantiles_by_hand():
    from vipo_trl.eval import mean_interval, t_quantile

    # Published two-sided 95% quantiles of Student's t.
    for df, expected in [(1, 12.706), (4, 2.776), (9, 2.262), (29, 2.045)]:
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)
    assert t_quantile(0.95, 4) == pytest.approx(2.132, abs=1e-3)
    # 1..5: mean 3, sd sqrt(2.5), half width 2.776 * sqrt(2.5) / sqrt(5) = 1.963.
    interval = mean_interval([1, 2, 3, 4, 5])
    assert interval.mean == 3.0 and interval.half_width == pytest.approx(1.9632, abs=1e-3)
    assert interval.excludes_zero() and not mean_interval([-1, 1, 2]).excludes_zero()
    assert math.isinf(mean_interval([0.5]).half_width)
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([])


def test_win_rate_and_its_wilson_interval_by_hand():
    a = torch.tensor([3.0, 2.0, 5.0, 1.0, 4.0, 4.0, 0.0, 9.0])
    b = torch.tensor([1.0, 2.0, 4.0, 2.0, 3.0, 4.0, 1.0, 1.0])
    result = win_rate(a, b)
    # 4 wins (3>1, 5>4, 4>3, 9>1), 2 ties, 2 losses: p = (4 + 1) / 8.
    assert (result.wins, result.ties, result.losses) == (4, 2, 2)
    p, n, z = 5 / 8, 8, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert result.rate == pytest.approx(0.625)
    assert result.low == pytest.approx(centre - half) and result.high == pytest.approx(centre + half)
    assert result.low == pytest.approx(0.3057, abs=1e-3) and result.high == pytest.approx(0.8632, abs=1e-3)
    with pytest.raises(ValueError, match="same shape|one shape"):
        win_rate(a, b[:3])


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def rendered_pairs(n, flip_rate=0.0, loser="color_shape", seed=0):
    """Winner: the prompt's scene; loser: the scene with a wrong colour and shape, a wrong position only, or
    (`other_prompt`) the scene of another prompt sharing no attribute. Exactly round(flip_rate * n) labels flipped."""
    rng = np.random.default_rng(seed)
    flips = set(rng.choice(n, size=round(flip_rate * n), replace=False).tolist())
    colors, shapes, positions = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"], ["left", "top"]
    rows = {"prompt": [], "chosen": [], "rejected": [], "category": []}
    for i in range(n):
        scene = ALL_SCENES[i % len(ALL_SCENES)]
        wrong_color = colors[(colors.index(scene.color) + 1) % 4]
        wrong_shape = shapes[(shapes.index(scene.shape) + 1) % 3]
        wrong_position = "right" if scene.position in positions else "left"
        lost_scene = {
            "color_shape": Scene(wrong_color, wrong_shape, scene.position),
            "position": Scene(scene.color, scene.shape, wrong_position),
            "other_prompt": Scene(wrong_color, wrong_shape, wrong_position),
        }[loser]
        won, lost = render(scene, rng), render(lost_scene, rng)
        if i in flips:
            won, lost = lost, won
        rows["prompt"].append(scene.prompt)
        rows["chosen"].append(_png(won))
        rows["rejected"].append(_png(lost))
        rows["category"].append("first-half" if i < n // 2 else "second-half")
    return Dataset.from_dict(rows)


def test_diagnose_recovers_a_known_flip_rate_and_tells_easy_from_clean(tmp_path):
    noisy = diagnose(rendered_pairs(40, flip_rate=0.3), ["shapes"], output_dir=tmp_path / "noisy")
    assert noisy.pairs == 40
    assert noisy.scorers["shapes"].disagree == pytest.approx(0.3)
    assert noisy.consistency == pytest.approx(0.7)
    saved = json.loads((tmp_path / "noisy" / "diagnosis.json").read_text())
    assert saved["scorers"]["shapes"]["agreement"] == pytest.approx(0.7)
    assert (tmp_path / "noisy" / "diagnosis.png").stat().st_size > 1000
    assert "suggested poly_alpha" in (tmp_path / "noisy" / "diagnosis.txt").read_text()

    clean = diagnose(rendered_pairs(40, loser="position"), ["shapes"])
    easy = diagnose(rendered_pairs(40, loser="other_prompt"), ["shapes"])
    assert clean.consistency == easy.consistency == 1.0
    # A clean loser gets two of the prompt's three attributes right; an easy loser none.
    assert clean.easy_share < 0.2 < 0.8 < easy.easy_share
    assert "nearest to the alpha study's easy set" in easy.reason and "clean set" in clean.reason

    from vipo_trl.data import DataOptions

    by_category = diagnose(rendered_pairs(40, flip_rate=0.5), ["shapes"], DataOptions(category_column="category"))
    counts = [by_category.categories[c]["pairs"] for c in ("first-half", "second-half")]
    assert counts == [20, 20]
    consistencies = [by_category.categories[c]["consistency"] for c in ("first-half", "second-half")]
    assert sum(consistencies) / 2 == pytest.approx(by_category.consistency)


def test_diagnose_skips_and_counts_the_rows_training_would_skip():
    from datasets import concatenate_datasets

    good = rendered_pairs(12)
    first = good[0]
    bad = Dataset.from_dict(
        {
            "prompt": [first["prompt"]] * 3,
            "chosen": [first["chosen"], b"not an image", first["chosen"]],
            "rejected": [first["chosen"], first["rejected"], first["chosen"]],  # identical, undecodable, identical
            "category": ["x"] * 3,
        },
        features=good.features,
    )
    data = concatenate_datasets([good, bad])
    for dataset in (data, data.to_iterable_dataset()):
        report = diagnose(dataset, ["shapes"])
        assert report.pairs == 12 and report.consistency == 1.0  # identical pairs would have been scored as ties
        assert report.skipped_rows == {"identical": 2, "undecodable": 1}
        assert "rows skipped as training would skip them: 2 identical, 1 undecodable" in str(report)


def test_summarize_and_suggest_alpha_by_hand():
    scores = {
        "a": {"chosen": torch.tensor([2.0, 1.0, 3.0, 1.0]), "rejected": torch.tensor([1.0, 2.0, 3.0, 0.0])},
        "b": {"chosen": torch.tensor([5.0, 5.0, 5.0, 5.0]), "rejected": torch.tensor([4.0, 4.0, 6.0, 6.0])},
    }
    report = summarize(scores)
    assert (report.scorers["a"].agree, report.scorers["a"].disagree, report.scorers["a"].tie) == (0.5, 0.25, 0.25)
    assert report.scorers["b"].agreement == 0.5
    assert report.consistency == 0.25  # only the first pair: both scorers prefer the winner
    assert report.easy_share == 0.0  # no scores under other prompts: nothing is called easy
    from vipo_trl.eval import MEASURED_SETS, paper_alpha

    # The paper's regimes, as read here.
    assert paper_alpha(0.25, 0.0)[0] == 8.0 and paper_alpha(0.9, 0.0)[0] == 0.0
    assert 0 < paper_alpha(0.45, 0.0)[0] < 8 and paper_alpha(0.9, 0.9)[0] == -1.0
    # The suggestion is the alpha measured on the nearest studied set, each set mapping to itself.
    for measured in MEASURED_SETS:
        alpha, reason = suggest_alpha(measured.consistency, measured.easy_share)
        assert alpha == measured.best_alpha and f"alpha study's {measured.name} set" in reason
    assert "noisy set" in suggest_alpha(0.21, 0.0)[1]  # Pick-a-Pic v2's consistency is nearest the noisy set


def test_diagnose_calibration_follows_the_alpha_study_results():
    """`MEASURED_SETS.best_alpha` is the study's rule applied to docs/alpha_study/results.json: the alpha whose
    paired gain over alpha 0 has a 95% interval above 0 (the larger mean if several), else 0. A rerun of the study
    that changes the answer must change the calibration."""
    from vipo_trl.eval import MEASURED_SETS

    results = json.loads((Path(__file__).resolve().parents[1] / "docs" / "alpha_study" / "results.json").read_text())
    for measured in MEASURED_SETS:
        better = [d for d in results["stats"]["versus_dpo"] if d["set"] == measured.name and d["difference"]["low"] > 0]
        best = max(better, key=lambda d: d["difference"]["mean"])["alpha"] if better else 0.0
        assert measured.best_alpha == best, measured.name
        seeds = {c["n"] for c in (cell["gain"] for cell in results["stats"]["cells"] if cell["set"] == measured.name)}
        assert f"{seeds.pop()} seeds" in measured.finding  # the finding quotes the study it came from


def test_eval_scores_base_and_lora_on_the_same_seeds_and_writes_its_report(tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict

    from vipo_trl.default import MODEL_DIR, load_default_pipeline

    pipe = load_default_pipeline()
    torch.manual_seed(0)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)  # a LoRA that visibly changes the output
    type(pipe).save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet))

    prompts = [s.prompt for s in ALL_SCENES[:3]]
    result = evaluate_alignment(
        str(MODEL_DIR),
        str(tmp_path / "lora"),
        prompts,
        ["shapes"],
        seeds=(1, 2),
        num_inference_steps=4,
        guidance_scale=4.0,
        output_dir=tmp_path / "eval",
        device="cpu",
    )
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["prompts"] == [p for p in prompts for _ in (1, 2)] and saved["seeds"] == [1, 2] * 3
    base, aligned = torch.tensor(saved["base_scores"]["shapes"]), torch.tensor(saved["aligned_scores"]["shapes"])
    assert saved["summary"]["shapes"]["win_rate"]["rate"] == pytest.approx(win_rate(aligned, base).rate)
    assert saved["summary"]["shapes"]["base_mean"] == pytest.approx(base.mean().item())
    # The base images are the base model's: scoring them again without the LoRA gives the same numbers.
    again = evaluate_alignment(
        str(MODEL_DIR), None, prompts, ["shapes"], seeds=(1, 2), num_inference_steps=4, guidance_scale=4.0, device="cpu"
    )
    assert again.base_scores == result.base_scores and not again.win_rates
    grid = Image.open(tmp_path / "eval" / "grid.png")
    assert grid.size == (LABEL_WIDTH + 6 * 256, CAPTION_HEIGHT + 2 * 256)  # labelled rows base, aligned
    assert_rows_differ(grid, 256)  # the bottom row was generated with the LoRA applied
    assert (tmp_path / "eval" / "scores.png").exists() and "| shapes |" in (
        tmp_path / "eval" / "results.md"
    ).read_text()


def assert_rows_differ(grid, row_height):
    """The grid's base row (top) and aligned row (bottom) are different images: the LoRA reached the pipeline."""
    from vipo_trl.models.generation import CAPTION_HEIGHT, LABEL_WIDTH

    pixels = np.asarray(grid.convert("RGB"), dtype=np.int16)[CAPTION_HEIGHT:, LABEL_WIDTH:]
    top, bottom = pixels[:row_height], pixels[row_height : 2 * row_height]
    assert top.shape == bottom.shape and np.abs(top - bottom).mean() > 5, np.abs(top - bottom).mean()


def make_shapes_lora(folder, seed=0):
    """A LoRA for the embedded model that visibly changes its output."""
    from peft import LoraConfig, get_peft_model_state_dict

    from vipo_trl.default import load_default_pipeline

    pipe = load_default_pipeline()
    torch.manual_seed(seed)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    type(pipe).save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return str(folder)


@pytest.fixture
def shapes_lora(tmp_path):
    return make_shapes_lora(tmp_path / "lora")


def make_shapes_fine_tune(folder):
    """A full fine-tune's output for the embedded model (its UNet, saved whole) that visibly changes its output."""
    from vipo_trl.default import load_default_pipeline

    unet = load_default_pipeline().unet
    torch.manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    unet.save_pretrained(folder)  # what `vipo-trl train` without --use_peft saves
    return str(folder)


@pytest.mark.parametrize("baseline_kind", ["lora", "full"])
def test_eval_compares_two_runs_on_the_same_prompts_and_seeds(tmp_path, baseline_kind):
    """`baseline`: the two runs generate in turn from one pipeline; each one's images are exactly those it makes
    alone against the base (so the baseline's weights were taken out before the other run's went in)."""
    from vipo_trl.default import MODEL_DIR, load_default_pipeline

    run = make_shapes_lora(tmp_path / "poly-dpo", seed=1)
    other = (
        make_shapes_lora(tmp_path / "diffusion-dpo", seed=2)
        if baseline_kind == "lora"
        else make_shapes_fine_tune(tmp_path / "diffusion-dpo")
    )
    setting = dict(prompts=[s.prompt for s in ALL_SCENES[:3]], scorers=["shapes"], seeds=(1, 2), device="cpu")
    setting.update(num_inference_steps=3, guidance_scale=4.0)
    pipe = load_default_pipeline()
    unet = pipe.unet
    head_to_head = evaluate_alignment(pipe, run, baseline=other, output_dir=tmp_path / "eval", **setting)
    # The baseline was taken out, not left beside the run: the pipeline's own UNet, holding the run's LoRA alone.
    assert pipe.unet is unet and len(pipe.get_list_adapters()["unet"]) == 1
    alone = evaluate_alignment(str(MODEL_DIR), run, **setting)
    other_alone = evaluate_alignment(str(MODEL_DIR), other, **setting)
    assert head_to_head.base_scores == other_alone.aligned_scores != other_alone.base_scores
    assert head_to_head.aligned_scores == alone.aligned_scores != other_alone.aligned_scores
    wins = win_rate(torch.tensor(alone.aligned_scores["shapes"]), torch.tensor(other_alone.aligned_scores["shapes"]))
    assert head_to_head.win_rates["shapes"].rate == pytest.approx(wins.rate)
    assert head_to_head.labels == ("diffusion-dpo", "poly-dpo")
    report = (tmp_path / "eval" / "results.md").read_text()
    assert "| scorer | diffusion-dpo | poly-dpo | win rate (poly-dpo over diffusion-dpo, 95% CI) |" in report
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["labels"] == ["diffusion-dpo", "poly-dpo"]
    with pytest.raises(ValueError, match="baseline: name the run to compare"):
        evaluate_alignment(str(MODEL_DIR), None, baseline=other, **setting)


def test_eval_command_on_the_embedded_model(tmp_path, shapes_lora, capsys):
    from vipo_trl.cli import main

    out = tmp_path / "eval"
    main(["eval", "--lora", shapes_lora, "--num_prompts", "2", "--seeds", "0", "1", "--num_inference_steps", "3",
          "--output_dir", str(out), "--device", "cpu"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "4 images per model (2 prompts x seeds 0, 1)" in printed and "| shapes |" in printed
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["base_scores"]["shapes"]) == len(saved["aligned_scores"]["shapes"]) == 4
    assert_rows_differ(Image.open(out / "grid.png"), 256)  # --lora applied
    with pytest.raises(SystemExit):
        main(["eval", "--scorers", "pickscor", "--num_prompts", "1", "--output_dir", str(out)])
    assert "Did you mean 'pickscore'" in capsys.readouterr().err
    # Two runs head to head: --lora over --baseline.
    other = make_shapes_lora(tmp_path / "other", seed=3)
    main(["eval", "--lora", shapes_lora, "--baseline", other, "--num_prompts", "2", "--seeds", "0",
          "--num_inference_steps", "3", "--output_dir", str(out), "--device", "cpu"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "| scorer | other | lora | win rate (lora over other, 95% CI) |" in printed
    assert "grid.png (rows: other, lora)" in printed
    with pytest.raises(SystemExit):
        main(["eval", "--baseline", other, "--output_dir", str(out)])
    assert "--baseline is what --lora is compared with" in capsys.readouterr().err


def test_eval_and_pairs_take_a_full_fine_tunes_output_as_the_aligned_model(tmp_path, capsys, monkeypatch):
    from vipo_trl.cli import main
    from vipo_trl.default import load_default_pipeline

    make_shapes_fine_tune(tmp_path / "full")
    out = tmp_path / "eval"
    main(["eval", "--lora", str(tmp_path / "full"), "--num_prompts", "2", "--seeds", "0", "--num_inference_steps",
          "3", "--output_dir", str(out), "--device", "cpu"])  # fmt: skip
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["aligned_scores"]["shapes"]) == 2
    assert_rows_differ(Image.open(out / "grid.png"), 256)  # the fine-tuned UNet replaced the base's
    main(["pairs", "--lora", str(tmp_path / "full"), "--num_prompts", "2", "--samples_per_prompt", "2",
          "--num_inference_steps", "3", "--output_dir", str(tmp_path / "pairs"), "--device", "cpu"])  # fmt: skip
    capsys.readouterr()

    (tmp_path / "empty").mkdir()
    load_default_pipeline().vae.save_pretrained(tmp_path / "vae")  # a denoiser-shaped folder of another class
    monkeypatch.setattr("vipo_trl.eval.evaluate.generate_images", None)  # refused before generating anything
    for folder, message in (("empty", "holds neither a LoRA"), ("vae", "holds class AutoencoderKL, but the unet")):
        with pytest.raises(SystemExit):
            main(["eval", "--lora", str(tmp_path / folder), "--num_prompts", "1", "--output_dir", str(tmp_path / "e")])
        err = capsys.readouterr().err
        assert f"{tmp_path / folder}: {message}" in err and "Traceback" not in err, err


def test_a_scorer_whose_weights_cannot_be_read_is_one_line_naming_them(tmp_path, capsys, monkeypatch):
    from vipo_trl.cli import main
    from vipo_trl.eval import get_scorer
    from vipo_trl.eval.scorers import _SCORERS, CLIPSimilarityScorer, ScorerUnavailable

    empty = tmp_path / "no-weights"
    empty.mkdir()  # a folder without config.json: transformers' OSError, raised without touching the network
    with pytest.raises(ScorerUnavailable, match=r"scorer 'clip': cannot load its weights.*no-weights"):
        get_scorer("clip", model=str(empty))

    def offline_clip(model: str = str(empty), **kwargs):
        return CLIPSimilarityScorer(model=model, **kwargs)

    monkeypatch.setitem(_SCORERS._items, "offline_clip", offline_clip)
    with pytest.raises(SystemExit):
        main(["eval", "--scorers", "offline_clip", "--num_prompts", "1", "--output_dir", str(tmp_path / "e"),
              "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert "vipo-trl: error: scorer 'offline_clip'" in err and "hf download" in err and str(empty) in err, err
    assert "Traceback" not in err and not (tmp_path / "e").exists()  # stopped before generating anything


def test_eval_on_the_embedded_model_scores_the_samples_the_default_run_reports(tmp_path):
    """With no model named, `vipo-trl eval` samples as `vipo-trl train` reports its rewards (DDIM, 20 steps,
    guidance 4, batches of 48, the held-out seeds): the same images, so the same base reward."""
    from vipo_trl.cli import main
    from vipo_trl.default import ALL_SCENES, evaluate_reward, load_default_pipeline, reward

    main(["eval", "--seeds", "10001", "--output_dir", str(tmp_path), "--device", "cpu"])
    scores = json.loads((tmp_path / "results.json").read_text())["base_scores"]["shapes"]
    mean, images = evaluate_reward(load_default_pipeline(), seeds=(10_001,))
    assert scores == pytest.approx([reward(image, scene.prompt) for image, scene in zip(images, ALL_SCENES)])
    assert sum(scores) / len(scores) == pytest.approx(mean)


def test_diagnose_command_reads_a_dataset_folder(tmp_path, capsys):
    from vipo_trl.cli import main

    rendered_pairs(20, flip_rate=0.25).save_to_disk(str(tmp_path / "pairs"))
    main(["diagnose", str(tmp_path / "pairs"), "--scorers", "shapes", "--output_dir", str(tmp_path / "d")])
    printed = capsys.readouterr().out
    assert "disagrees 25.0%" in printed and "suggested poly_alpha" in printed
    command = next(line for line in printed.splitlines() if line.startswith("to train on the pairs every scorer"))
    assert f"vipo-trl pairs --dataset_name {tmp_path / 'pairs'} --scorers shapes --consistent_only" in command
    main(command.split("vipo-trl ", 1)[1].replace("CONSISTENT_SET", str(tmp_path / "kept")).split())  # it runs
    assert "15 pairs (20 candidates)" in capsys.readouterr().out  # the 5 flipped labels are the ones dropped
    assert json.loads((tmp_path / "d" / "diagnosis.json").read_text())["pairs"] == 20
    with pytest.raises(SystemExit):
        main(["diagnose", "default:mystery"])
    assert "default:clean" in capsys.readouterr().err


def test_reward_callback_logs_scores_and_win_rate_during_training(tmp_path):
    from peft import LoraConfig

    from vipo_trl import PolyDPOConfig, PolyDPOTrainer
    from vipo_trl.default import MODEL_DIR
    from vipo_trl.eval import RewardEvalCallback

    args = PolyDPOConfig(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
        resolution=32, random_flip=False, save_strategy="no", report_to=[], use_cpu=True, logging_steps=100,
        disable_tqdm=True,
    )  # fmt: skip
    trainer = PolyDPOTrainer(str(MODEL_DIR), args, rendered_pairs(8, loser="position"), peft_config=LoraConfig(r=4))
    prompts = [s.prompt for s in ALL_SCENES[:3]]
    trainer.add_callback(RewardEvalCallback(trainer, prompts, ["shapes"], eval_steps=2, num_inference_steps=3))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "reward/shapes" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    for entry in logged:
        assert 0.0 <= entry["reward/shapes"] <= 1.0 and 0.0 <= entry["reward/shapes_win_rate"] <= 1.0


def test_load_prompts_reads_text_json_and_dataset_columns(tmp_path):
    from vipo_trl.eval import load_prompts
    from vipo_trl.eval.evaluate import BUILTIN_PROMPTS

    (tmp_path / "p.txt").write_text("a red cat\n\n a blue dog \n")
    (tmp_path / "p.json").write_text(json.dumps(["x", "y"]))
    Dataset.from_dict({"caption": ["b", "a", "b"], "other": [1, 2, 3]}).to_parquet(str(tmp_path / "d.parquet"))
    assert load_prompts(str(tmp_path / "p.txt")) == ["a red cat", "a blue dog"]
    assert load_prompts(str(tmp_path / "p.json"), limit=1) == ["x"]
    assert load_prompts(tmp_path / "p.json", limit=1) == ["x"]  # a Path too
    assert load_prompts(str(tmp_path / "d.parquet")) == ["b", "a"]  # unique, in order
    # A generic-schema preference set names its prompts `prompt`: found without --prompt_column.
    Dataset.from_dict({"prompt": ["c", "d"], "chosen": [b"", b""]}).to_parquet(str(tmp_path / "g.parquet"))
    assert load_prompts(str(tmp_path / "g.parquet")) == ["c", "d"]
    assert load_prompts(None) == list(BUILTIN_PROMPTS)
    with pytest.raises(ValueError, match=r"no column 'prompt'.*set --prompt_column"):
        load_prompts(str(tmp_path / "d.parquet"), column="prompt")


def test_reports_are_written_without_matplotlib(tmp_path, monkeypatch):
    """matplotlib is an optional extra: without it eval and diagnose write every number and say which plot is
    missing, instead of failing at the end of a long run."""
    import sys

    from vipo_trl.eval.evaluate import EvalResult, write_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    image = Image.new("RGB", (32, 32))
    result = EvalResult(["a", "b"], [0, 0], {"shapes": [0.5, 0.7]}, {"shapes": [0.6, 0.9]})
    with pytest.warns(UserWarning, match="scores.png not drawn: matplotlib is not installed"):
        write_report(result, [image] * 2, [image] * 2, tmp_path / "eval")
    assert (tmp_path / "eval" / "results.json").is_file() and (tmp_path / "eval" / "grid.png").is_file()
    assert not (tmp_path / "eval" / "scores.png").exists()
    with pytest.warns(UserWarning, match="diagnosis.png not drawn"):
        diagnose(rendered_pairs(4, flip_rate=0.0), ["shapes"], output_dir=tmp_path / "diag")
    assert (tmp_path / "diag" / "diagnosis.json").is_file() and not (tmp_path / "diag" / "diagnosis.png").exists()
