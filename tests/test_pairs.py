"""Making preference data (`make_pairs`, `vipo-trl pairs`): each stage on tiny models, the pairwise judge's A/B swap,
video scores on a tiny Wan pipeline, resuming after a kill, the dataset card and the upload."""

import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vipo_trl.data.pairing import (
    PairFilters,
    apply_filters,
    balance_categories,
    combine_scores,
    consistent_with_every_scorer,
    pair_indices,
)
from vipo_trl.default import DEFAULT_LORA, DEFAULT_SETTINGS
from vipo_trl.eval import (
    FrameAveragedScorer,
    RewardScorer,
    VLMJudge,
    evaluate_alignment,
    make_pairs,
    order_consistent_verdict,
    register_scorer,
    sample_frames,
)
from vipo_trl.eval.pairs import prompts_per_batch
from vipo_trl.testing import save_tiny_vlm, sd_pipeline, wan_pipeline

ROOT = Path(__file__).resolve().parents[1]


class Redness(RewardScorer):
    """Mean red minus mean blue (0-255 scale): a cheap programmatic scorer; counts the images it scored."""

    calls = 0

    def _score_batch(self, images, prompts):
        Redness.calls += len(images)
        return torch.tensor([_channel_mean(im, 0) - _channel_mean(im, 2) for im in images])


class Greenness(RewardScorer):
    def _score_batch(self, images, prompts):
        return torch.tensor([_channel_mean(im, 1) for im in images])


def _channel_mean(image, channel):
    return float(np.asarray(image.convert("RGB"), dtype=np.float32)[..., channel].mean())


register_scorer("test_redness")(Redness)
register_scorer("test_greenness")(Greenness)

PROMPTS = [("a red square", "colour"), ("a blue circle", "colour"), ("two cats", "counting"), ("a sign", "text")]


def _make(out, pipe=None, **kwargs):
    settings = dict(samples_per_prompt=3, num_inference_steps=2, prompts_per_shard=2, progress=False)
    settings.update(kwargs)
    return make_pairs(PROMPTS, pipe or sd_pipeline(), ["test_redness"], out, **settings)


# ---------------------------------------------------------------------------------------------- pure stages


def test_combine_scores_and_the_pairing_rules_by_hand():
    scores = torch.tensor([[1.0, 10.0], [3.0, 0.0], [2.0, 5.0]])  # 3 samples x 2 scorers
    assert combine_scores(scores, "weighted_sum").tolist() == [11.0, 3.0, 7.0]
    assert combine_scores(scores, "weighted_sum", [1.0, 0.1]).tolist() == pytest.approx([2.0, 3.0, 2.5])
    # ranks per scorer (0 = worst): scorer 1 -> 0, 2, 1; scorer 2 -> 2, 0, 1
    assert combine_scores(scores, "rank_average").tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="one per scorer"):
        combine_scores(scores, "weighted_sum", [1.0])

    combined = torch.tensor([0.2, 0.9, 0.6, 0.1])
    assert pair_indices(combined, "best_worst") == [(1, 3)]
    assert pair_indices(combined, "best_worst", margin=0.8) == []  # 0.9 - 0.1 is not past 0.8
    # margins: (1,3) .8, (1,0) .7, (2,3) .5, (2,0) .4, (1,2) .3, (0,3) .1; the largest first
    assert pair_indices(combined, "all_pairs", margin=0.35) == [(1, 3), (1, 0), (2, 3), (2, 0)]
    assert pair_indices(torch.tensor([0.5]), "best_worst") == []


def test_consistency_filter_on_a_hand_built_case():
    scores = torch.tensor([[0.9, 0.8], [0.1, 0.2], [0.5, 0.9]])
    assert consistent_with_every_scorer(scores, 0, 1)  # both scorers prefer 0 over 1
    assert not consistent_with_every_scorer(scores, 0, 2)  # scorer 2 prefers 2
    rows = [
        {"prompt": "p", "category": "a", "consistent": True, "score_margin": 0.8, "judge": None},
        {"prompt": "q", "category": "a", "consistent": False, "score_margin": 0.1, "judge": None},
        {"prompt": "r", "category": "b", "consistent": True, "score_margin": 0.3, "judge": None},
        {"prompt": "s", "category": "b", "consistent": True, "score_margin": 0.2, "judge": -1},
    ]
    kept, stats = apply_filters(rows, PairFilters(consistent_only=True, max_margin=0.5))
    assert [r["prompt"] for r in kept] == ["r"]
    assert stats.consistency == 0.75 and stats.candidate_pairs == 4 and stats.pairs == 1
    assert stats.removed == {"judge_disagrees_or_order_inconsistent": 1, "scorers_disagree": 1, "too_easy": 1}
    kept, _ = apply_filters(rows, PairFilters(judge_agrees=False))
    assert len(kept) == 4


def test_category_balance_keeps_the_smallest_count_of_each():
    rows = [{"category": "a", "i": i} for i in range(5)] + [{"category": "b", "i": i} for i in range(2)]
    kept = balance_categories(rows, seed=0)
    assert sorted(r["category"] for r in kept) == ["a", "a", "b", "b"]
    assert balance_categories(rows, seed=0) == kept  # seeded
    assert [r for r in kept if r["category"] == "b"] == rows[5:]
    assert balance_categories(rows[:3]) == rows[:3]  # one category: nothing to balance


# ---------------------------------------------------------------------------------------------- make_pairs


def test_make_pairs_is_reproducible_and_independent_of_the_shard_size(tmp_path):
    a = _make(tmp_path / "a")
    b = _make(tmp_path / "b", prompts_per_shard=3)
    assert len(a.dataset) == len(PROMPTS)  # best vs worst: one pair per prompt
    assert a.dataset["chosen"] == b.dataset["chosen"] and a.dataset["rejected"] == b.dataset["rejected"]
    assert a.dataset["chosen_seed"] == b.dataset["chosen_seed"]
    c = _make(tmp_path / "c", seed=1)
    assert c.dataset["chosen"] != a.dataset["chosen"]  # the seed fixes the samples
    row = a.dataset[0]
    chosen, rejected = (Image.open(io.BytesIO(row[k])) for k in ("chosen", "rejected"))
    scorer = Redness()
    assert row["chosen_test_redness"] == pytest.approx(float(scorer.score([chosen], ["x"])), abs=1e-4)
    assert row["chosen_test_redness"] > row["rejected_test_redness"]
    assert row["score_margin"] == pytest.approx(row["chosen_score"] - row["rejected_score"])


class CountingPipeline:
    """A pipeline that records how many samples each call generates."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, prompts, **kwargs):
        self.calls.append(len(prompts))
        return self.pipe(prompts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def test_batch_size_generates_whole_prompts_together(tmp_path):
    assert [prompts_per_batch(b, 3) for b in (2, 3, 6, 8)] == [1, 1, 2, 2]
    assert prompts_per_batch(8, 4, pipelines=2) == 4  # 2 samples a prompt from each pipeline
    calls = {}
    for batch_size, shard in ((6, 1), (6, 3), (2, 2)):
        pipe = CountingPipeline(sd_pipeline())
        result = _make(tmp_path / f"b{batch_size}-{shard}", pipe, batch_size=batch_size, prompts_per_shard=shard)
        calls[batch_size, shard] = pipe.calls
        if batch_size == 6:
            assert result.dataset["chosen"] == calls.setdefault("set", result.dataset["chosen"])
    assert calls[6, 1] == calls[6, 3] == [6, 6]  # two prompts a call, whatever the shard size (rounded to 2 or 4)
    assert calls[2, 2] == [2, 1] * 4  # one prompt's 3 samples do not fit: 2 + 1, one prompt at a time


def test_make_pairs_with_two_scorers_two_pipelines_and_filters(tmp_path):
    pipes = {"small": sd_pipeline(), "other": sd_pipeline("v_prediction")}
    result = make_pairs(
        PROMPTS * 2,
        pipes,
        ["test_redness", "test_greenness"],
        tmp_path / "out",
        samples_per_prompt=4,
        num_inference_steps=2,
        combine="rank_average",
        pairing="all_pairs",
        filters=PairFilters(balance=True),
        progress=False,
    )
    data = result.dataset
    assert set(data["chosen_generator"]) | set(data["rejected_generator"]) == {"small", "other"}
    counts = {c: data["category"].count(c) for c in set(data["category"])}
    assert len(set(counts.values())) == 1, counts  # balanced
    assert result.stats.consistency == pytest.approx(
        sum(
            (r["chosen_test_redness"] > r["rejected_test_redness"])
            and (r["chosen_test_greenness"] > r["rejected_test_greenness"])
            for r in _shard_rows(tmp_path / "out")
        )
        / result.stats.candidate_pairs
    )
    # all_agree keeps only the pairs both scorers order alike (filters rerun without generating again)
    again = make_pairs(
        PROMPTS * 2, pipes, ["test_redness", "test_greenness"], tmp_path / "out", samples_per_prompt=4,
        num_inference_steps=2, combine="rank_average", pairing="all_pairs",
        filters=PairFilters(consistent_only=True), progress=False,
    )  # fmt: skip
    assert all(again.dataset["consistent"]) and len(again.dataset) < result.stats.candidate_pairs


def _shard_rows(folder):
    import pyarrow.parquet as pq

    return [r for p in sorted((folder / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    _make(tmp_path / "out")
    with pytest.raises(ValueError, match="samples_per_prompt"):
        _make(tmp_path / "out", samples_per_prompt=4)


def test_resume_after_a_kill_mid_shard_regenerates_only_that_shard(tmp_path):
    """A build killed (SIGKILL) while scoring its third shard keeps the two finished shards; the rerun scores only
    the rest and gives the same set as a build never interrupted."""
    script = ROOT / "tests" / "scripts" / "make_pairs_run.py"
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, str(script), str(out), "--kill_after_images", "7"], capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert sorted(p.name for p in (out / "shards").glob("*.parquet")) == ["shard-00000.parquet", "shard-00001.parquet"]
    resumed = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["images_scored"] == 6  # shards 2 and 3 (3 + 3 samples)
    whole = subprocess.run([sys.executable, str(script), str(tmp_path / "whole")], capture_output=True, text=True)
    assert json.loads(whole.stdout.strip().splitlines()[-1])["images_scored"] == 12
    read = [_published(folder) for folder in (out, tmp_path / "whole")]
    assert read[0] == read[1] and len(read[0]) == 4


@pytest.mark.parametrize("mode, port, images", [("make_pairs", 29531, 6), ("rescore", 29532, 8)])
def test_two_processes_share_the_shards_and_give_the_single_process_set(tmp_path, mode, port, images):
    """Under `accelerate launch` (2 CPU processes, gloo) each process makes every other shard (generating, or scoring
    an existing set's pairs) and the main process writes the set, which equals the one a single process builds."""
    script = [str(ROOT / "tests" / "scripts" / "make_pairs_run.py"), *(["--rescore"] if mode == "rescore" else [])]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    accelerate += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    accelerate += ["--main_process_port", str(port)]
    run = subprocess.run([*accelerate, *script, str(tmp_path / "two")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    reports = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert sorted((r["rank"], r["images_scored"]) for r in reports) == [(0, images), (1, images)]  # 2 of 4 shards
    # accelerate runs each process with one intra-op thread; so does the reference run (the same float arithmetic)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *script, str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    assert _published(tmp_path / "two") == _published(tmp_path / "one")


def _published(folder):
    import pyarrow.parquet as pq

    rows = [r for p in sorted((folder / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]


def test_dataset_card_and_the_set_loads_back_and_uploads(tmp_path, monkeypatch):
    from datasets import load_dataset
    from fake_hub import FakeHub

    result = _make(tmp_path / "out", filters=PairFilters(balance=True))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- preference" in card.split("---")[1]
    per_category = {c: result.dataset["category"].count(c) for c in set(result.dataset["category"])}
    for category, count in per_category.items():
        assert f"| {category} | {count} |" in card
    assert "Consistency: 100.0% of the 4 candidate pairs" in card  # one scorer always agrees with itself
    assert "| samples_per_prompt | 3 |" in card and "| filter: balance | true |" in card
    loaded = load_dataset(str(tmp_path / "out"), split="train")  # data/train-*.parquet is found by itself
    assert loaded["prompt"] == result.dataset["prompt"]
    # another set in a folder of the same name loads its own rows (not a cached copy of the first folder's)
    other = _make(tmp_path / "elsewhere" / "out", seed=7)
    again = load_dataset(str(tmp_path / "elsewhere" / "out"), split="train")
    assert again["chosen"] == other.dataset["chosen"] != loaded["chosen"]

    import huggingface_hub.constants as constants

    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        from vipo_trl.data.pairing import PairsFolder

        PairsFolder(tmp_path / "out").push_to_hub("alice/pairs", token="hf_test")
        files = hub.repos["alice/pairs"]
    assert "README.md" in files and not any(name.startswith("shards/") for name in files)
    published = [n for n in files if n.startswith("data/")]
    assert published and files[published[0]] == (tmp_path / "out" / published[0]).read_bytes()


# ---------------------------------------------------------------------------------------------- the judge


def test_order_consistent_verdicts_by_hand():
    assert order_consistent_verdict(True, False) == 1  # A first, then B once swapped: image 1 both times
    assert order_consistent_verdict(False, True) == -1
    assert order_consistent_verdict(True, True) == 0  # always the first shown: position, not image
    assert order_consistent_verdict(False, False) == 0


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    return VLMJudge(save_tiny_vlm(tmp_path_factory.mktemp("vlm")), device="cpu", batch_size=3)


def _steer(judge, rule):
    """Make the tiny judge's A-vs-B logits follow `rule(pixel_values of A, of B)` (> 0: A) through a forward hook on
    the real model, so the images reach the answer through the processor's real image order."""
    a, b = judge.answer_ids

    def hook(module, args, kwargs, output):
        pixels = kwargs["pixel_values"]
        first, second = pixels[0::2], pixels[1::2]  # two images per row, in the order shown
        bias = rule(first, second)
        output.logits[:, -1, a] += 50 * bias
        output.logits[:, -1, b] -= 50 * bias
        return output

    return judge.model.register_forward_hook(hook, with_kwargs=True)


def test_the_judge_swaps_a_and_b_and_keeps_only_order_consistent_verdicts(judge):
    red, blue = Image.new("RGB", (20, 20), (220, 20, 20)), Image.new("RGB", (20, 20), (20, 20, 220))
    first, second, prompts = [red, blue, red], [blue, red, red], ["a red square"] * 3
    # the random judge: whatever it says, a verdict is antisymmetric in the order of the two images
    assert torch.equal(judge.compare(first, second, prompts), -judge.compare(second, first, prompts))

    redder = lambda x, y: torch.sign(x[:, 0].mean((1, 2)) - y[:, 0].mean((1, 2)))  # noqa: E731
    handle = _steer(judge, redder)
    try:
        assert judge.compare(first, second, prompts).tolist() == [1.0, -1.0, 0.0]  # a tie is no verdict
    finally:
        handle.remove()

    handle = _steer(judge, lambda x, y: torch.ones(x.shape[0]))  # always answers A: pure position bias
    try:
        assert judge.compare(first, second, prompts).tolist() == [0.0, 0.0, 0.0]
    finally:
        handle.remove()


def test_make_pairs_with_the_judge_alone_orders_pairs_by_its_verdicts(judge, tmp_path):
    redder = lambda x, y: torch.sign(x[:, 0].mean((1, 2)) - y[:, 0].mean((1, 2)))  # noqa: E731
    handle = _steer(judge, redder)
    try:
        result = make_pairs(PROMPTS[:2], sd_pipeline(), [judge], tmp_path / "j", samples_per_prompt=3,
                            num_inference_steps=2, progress=False)  # fmt: skip
    finally:
        handle.remove()
    for row in result.dataset:  # the steered judge prefers the image with more red (the red channel's mean)
        chosen, rejected = (Image.open(io.BytesIO(row[k])) for k in ("chosen", "rejected"))
        assert _channel_mean(chosen, 0) > _channel_mean(rejected, 0)
    assert len(result.dataset) >= 4  # 3 pairs per prompt, minus exact ties
    assert set(result.dataset["judge"]) == {1}


# ---------------------------------------------------------------------------------------------- video


WAN_CALL = {"height": 16, "width": 16, "num_frames": 9, "max_sequence_length": 8}


def test_sample_frames_spreads_from_first_to_last():
    video = list(range(9))
    assert sample_frames(video, 3) == [0, 4, 8] and sample_frames(video, 20) == video
    assert sample_frames(video, 1) == [0]


def test_video_scores_are_frame_averages_on_a_tiny_wan_pipeline(tmp_path):
    pipe = wan_pipeline()
    result = evaluate_alignment(pipe, None, ["a red clip", "a cat"], ["test_redness"], seeds=(0,),
                                num_inference_steps=2, pipeline_kwargs=WAN_CALL, frames_scored=3,
                                output_dir=tmp_path / "eval", device="cpu")  # fmt: skip
    from vipo_trl.models.generation import generate_images

    videos = generate_images(pipe, ["a red clip", "a cat"], [0, 0], num_inference_steps=2, **WAN_CALL)
    assert len(videos[0]) == 9
    scorer = Redness()
    by_hand = [float(scorer.score(sample_frames(v, 3), ["x"] * 3).mean()) for v in videos]
    wrapped = FrameAveragedScorer(Redness(), num_frames=3)
    assert wrapped.name == "scorer" and wrapped.score(videos, ["a", "b"]).tolist() == pytest.approx(by_hand, abs=1e-4)
    # Wan's tiny VAE decodes a pixel level differently from call to call, so eval's own samples match to rounding
    assert result.base_scores["test_redness"] == pytest.approx(by_hand, abs=0.5)
    first_frames = [float(scorer.score(v[:1], ["x"])) for v in videos]
    assert any(abs(a - b) > 0.5 for a, b in zip(by_hand, first_frames))  # averaging is not the first frame alone
    assert (tmp_path / "eval" / "grid.png").exists()


def test_video_pairs_are_written_as_mp4_and_decode_back(tmp_path):
    from vipo_trl.data import decode_video

    result = make_pairs([("a red clip", "video")], wan_pipeline(), ["test_redness"], tmp_path / "v",
                        samples_per_prompt=2, num_inference_steps=2, pipeline_kwargs=WAN_CALL, frames_scored=3,
                        progress=False)  # fmt: skip
    row = result.dataset[0]
    frames = decode_video(row["chosen"])
    assert len(frames) == 9 and frames[0].size == (16, 16)
    assert "text-to-video" in (tmp_path / "v" / "README.md").read_text()


def test_temporal_consistency_is_one_for_a_still_video_and_lower_when_it_jumps(tmp_path):
    from test_eval import tiny_clip

    from vipo_trl.eval import get_scorer

    scorer = get_scorer("temporal_consistency", model=tiny_clip(tmp_path / "clip"), device="cpu")
    still = [Image.new("RGB", (30, 30), (200, 30, 30))] * 4
    jumpy = [Image.new("RGB", (30, 30), c) for c in [(200, 30, 30), (30, 200, 30), (200, 30, 30), (30, 30, 200)]]
    scores = scorer.score([still, jumpy])
    assert scores[0] == pytest.approx(1.0, abs=1e-5) and scores[1] < 0.999


# ---------------------------------------------------------------------------------------------- the command


@pytest.mark.slow
def test_pairs_command_with_no_model_builds_a_set_from_the_embedded_model(tmp_path, capsys):
    from vipo_trl.cli.main import main

    out = tmp_path / "pairs"
    main(["pairs", "--num_prompts", "12", "--balance_categories", "--output_dir", str(out)])
    text = capsys.readouterr().out
    assert "pairs (" in text and "per category:" in text
    from datasets import load_dataset

    data = load_dataset(str(out), split="train")
    counts = {c: data["category"].count(c) for c in set(data["category"])}
    assert len(data) > 0 and len(set(counts.values())) == 1
    assert all(c > r for c, r in zip(data["chosen_shapes"], data["rejected_shapes"]))
    assert os.path.exists(out / "README.md")

    # the printed command trains the embedded model on the set at the size it was drawn at (32 px, not 512)
    (command,) = [line.split("train on it: ")[1] for line in text.splitlines() if line.startswith("train on it: ")]
    words = shlex.split(command)
    assert words[:2] == ["vipo-trl", "train"]
    run = tmp_path / "run"
    main([*words[1:], "--max_steps", "2", "--output_dir", str(run), "--report_to", "none", "--use_cpu"])
    config = json.loads((run / "poly_dpo_config.json").read_text())
    assert config["resolution"] == 32 and config["learning_rate"] == DEFAULT_SETTINGS["learning_rate"]
    from safetensors import safe_open

    with safe_open(str(run / "pytorch_lora_weights.safetensors"), "pt") as f:  # the embedded run's LoRA
        lora = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (lora["unet.r"], lora["unet.lora_alpha"]) == (DEFAULT_LORA["r"], DEFAULT_LORA["lora_alpha"])


def test_the_printed_train_command_uses_the_first_models_image_size():
    """Pairs from two pipelines (the model first, a stronger one second) at different sizes: the command trains the
    first model at its own samples' size, whatever size the first row's image has."""
    from datasets import Dataset

    from vipo_trl.cli.main import _train_command
    from vipo_trl.data.images import encode_png

    def png(size):
        return encode_png(Image.new("RGB", (size, size)))

    rows = Dataset.from_dict({"chosen": [png(64), png(32)], "chosen_generator": ["stronger", "mine + lora"]})
    words = shlex.split(_train_command("org/my model", "/tmp/pairs", rows, "mine + lora"))
    flags = dict(zip(words[3::2], words[4::2]))
    assert words[:3] == ["vipo-trl", "train", "--use_peft"]
    assert flags == {"--model_name_or_path": "org/my model", "--dataset_name": "/tmp/pairs", "--resolution": "32"}


def test_eval_and_pairs_commands_accept_a_wan_pipeline(tmp_path, capsys):
    from datasets import load_dataset

    from vipo_trl.cli.main import main
    from vipo_trl.data import decode_video

    model = tmp_path / "wan"
    wan_pipeline().save_pretrained(model)
    call = json.dumps(WAN_CALL)
    main(["eval", "--model_name_or_path", str(model), "--prompts", str(_prompt_file(tmp_path)), "--seeds", "0",
          "--scorers", "test_redness", "--num_inference_steps", "2", "--pipeline_kwargs", call, "--device", "cpu",
          "--output_dir", str(tmp_path / "eval")])  # fmt: skip
    assert "test_redness" in capsys.readouterr().out
    scores = json.loads((tmp_path / "eval" / "results.json").read_text())["base_scores"]["test_redness"]
    assert len(scores) == 2
    main(["pairs", "--model_name_or_path", str(model), "--prompts", str(_prompt_file(tmp_path)),
          "--scorers", "test_redness", "--samples_per_prompt", "2", "--num_inference_steps", "2",
          "--pipeline_kwargs", call, "--device", "cpu", "--output_dir", str(tmp_path / "pairs")])  # fmt: skip
    data = load_dataset(str(tmp_path / "pairs"), split="train")
    assert data["category"] == ["video", "video"] and len(decode_video(data[0]["rejected"])) == 9


def _prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("video\ta red clip\nvideo\ta blue clip\n")
    return path


# ---------------------------------------------------------------------------------------------- an existing set

# Redness (red minus blue): A +180, B -180, C -170, D +180; greenness: A 150, B 40, C 220, D 20.
A, B, C, D = (200, 150, 20), (20, 40, 200), (30, 220, 200), (210, 20, 30)


def _existing_set():
    """Four labelled pairs and an undecodable row: (A, B) both scorers agree with; (B, A) both contradict; (C, D)
    and (D, C) the two scorers disagree on (weighted sum: D wins, 200 to 50)."""
    from datasets import Dataset

    from vipo_trl.testing import png_bytes

    labelled = [(A, B), (B, A), (C, D), (D, C)]
    return Dataset.from_dict(
        {
            "prompt": [f"pair {i}" for i in range(5)],
            "chosen": [png_bytes(w) for w, _ in labelled] + [b"not an image"],
            "rejected": [png_bytes(lo) for _, lo in labelled] + [png_bytes(A)],
            "category": ["x", "x", "y", "y", "y"],
        }
    )


def _colours(dataset):
    """(chosen, rejected) of each row, as the nearest of A, B, C, D."""

    def nearest(data):
        mean = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32).mean((0, 1))
        return min((A, B, C, D), key=lambda colour: float(np.abs(mean - np.array(colour)).sum()))

    return [(nearest(row["chosen"]), nearest(row["rejected"])) for row in dataset]


def _rescore(out, dataset=None, scorers=("test_redness", "test_greenness"), **kwargs):
    from vipo_trl.eval import rescore_pairs

    settings = dict(pairs_per_shard=2, progress=False)
    settings.update(kwargs)
    return rescore_pairs(dataset or _existing_set(), list(scorers), out, **settings)


def test_rescoring_keeps_the_labels_and_drops_the_pairs_the_scorers_contradict(tmp_path):
    every = _rescore(tmp_path / "all")
    assert _colours(every.dataset) == [(A, B), (B, A), (C, D), (D, C)]  # the labels, as they were
    assert every.dataset["consistent"] == [True, False, False, False]
    assert every.dataset["label_agrees"] == [True, False, False, True]  # the weighted sum's winner is the label's
    assert every.dataset["source_row"] == [0, 1, 2, 3]
    assert every.dataset["score_margin"][1] == pytest.approx(-470, abs=5)  # the label's margin, negative here
    assert every.dataset["chosen_test_redness"][0] == pytest.approx(180, abs=3)
    assert every.stats.skipped_rows == {"undecodable": 1} and every.stats.label_agreement == 0.5

    consistent = _rescore(tmp_path / "consistent", filters=PairFilters(consistent_only=True))
    assert _colours(consistent.dataset) == [(A, B)]
    assert consistent.stats.candidate_pairs == 4 and consistent.stats.consistency == 0.25
    card = (tmp_path / "consistent" / "README.md").read_text()
    assert "keeping its labelled winner" in card and "| labels | dataset |" in card
    assert "The scorers prefer the source set's labelled winner in 50.0% of the candidate pairs." in card
    assert "Source rows skipped as training would skip them: undecodable: 1." in card
    assert "scorers_disagree: 3" in card


def test_relabelling_lets_the_scorers_choose_each_winner(tmp_path):
    relabelled = _rescore(tmp_path / "relabel", relabel=True)
    assert _colours(relabelled.dataset) == [(A, B), (A, B), (D, C), (D, C)]
    assert relabelled.dataset["consistent"] == [True, True, False, False]
    assert relabelled.dataset["label_agrees"] == [True, False, False, True]
    assert "keeping the scorers' winner" in (tmp_path / "relabel" / "README.md").read_text()
    # all_agree keeps the pairs both scorers order alike; a margin drops the pairs the scorers barely tell apart
    agreed = _rescore(tmp_path / "agree", relabel=True, combine="all_agree")
    assert _colours(agreed.dataset) == [(A, B), (A, B)]
    wide = _rescore(tmp_path / "margin", relabel=True, margin=160)  # combined margins: 470, 470, 150, 150
    assert _colours(wide.dataset) == [(A, B), (A, B)] and wide.dataset["source_row"] == [0, 1]


def test_rescoring_a_stream_resumes_and_a_changed_setting_is_refused(tmp_path, monkeypatch):
    import vipo_trl.eval.rescore as rescore_module

    whole = _rescore(tmp_path / "whole", relabel=True)
    streamed = _rescore(tmp_path / "stream", _existing_set().to_iterable_dataset(), relabel=True)
    assert streamed.dataset["chosen"] == whole.dataset["chosen"] and streamed.stats == whole.stats

    real, calls, kill = rescore_module._rescored_rows, [], [True]

    def killed_in_the_second_shard(*args, **kwargs):
        calls.append(len(args[0]))
        if len(calls) == 2 and kill and kill.pop():
            raise KeyboardInterrupt  # once
        return real(*args, **kwargs)

    monkeypatch.setattr(rescore_module, "_rescored_rows", killed_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        _rescore(tmp_path / "killed", relabel=True)
    calls.clear()
    resumed = _rescore(tmp_path / "killed", relabel=True)
    assert calls == [2, 0]  # the second shard (two pairs) and the third (the undecodable row); not the first
    assert resumed.dataset["chosen"] == whole.dataset["chosen"] and resumed.stats == whole.stats
    with pytest.raises(ValueError, match="other settings.*labels"):
        _rescore(tmp_path / "killed", relabel=False)


def test_rescoring_with_the_judge_alone(judge, tmp_path):
    redder = lambda x, y: torch.sign(x[:, 0].mean((1, 2)) - y[:, 0].mean((1, 2)))  # noqa: E731
    handle = _steer(judge, redder)
    try:
        from vipo_trl.eval import rescore_pairs

        relabelled = rescore_pairs(_existing_set(), [judge], tmp_path / "j", relabel=True, progress=False)
        kept = rescore_pairs(_existing_set(), [judge], tmp_path / "k", progress=False)  # judge_agrees by default
    finally:
        handle.remove()
    assert _colours(relabelled.dataset) == [(A, B), (A, B), (D, C), (D, C)]  # redder wins, whatever the label
    assert relabelled.dataset["label_agrees"] == [True, False, False, True]
    assert _colours(kept.dataset) == [(A, B), (D, C)]  # the labels the judge confirms


def test_pairs_command_rescores_an_existing_set(tmp_path, capsys):
    from vipo_trl.cli.main import main
    from vipo_trl.data import load_preference_dataset

    _existing_set().to_parquet(str(tmp_path / "pairs.parquet"))
    out = tmp_path / "out"
    main(["pairs", "--dataset_name", str(tmp_path / "pairs.parquet"), "--scorers", "test_redness", "test_greenness",
          "--consistent_only", "--output_dir", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "1 pairs (4 candidates; source rows skipped: 1 undecodable)" in printed
    assert "prefer the labelled winner on 50.0%" in printed
    assert f"train on it: vipo-trl train --model_name_or_path MODEL --dataset_name {out} --use_peft" in printed
    assert _colours(load_preference_dataset(str(out))) == [(A, B)]
    for extra in (["--samples_per_prompt", "3"], ["--model_name_or_path", "x"]):  # generation flags: refused
        with pytest.raises(SystemExit) as exc:
            main(["pairs", "--dataset_name", str(tmp_path / "pairs.parquet"), "--output_dir", str(out), *extra])
        assert exc.value.code == 2
        assert "scores the pairs an existing set already has" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pairs", "--relabel", "--output_dir", str(tmp_path / "x")])
    assert "--relabel applies to the pairs of an existing set" in capsys.readouterr().err


def test_rescoring_pickapic_counts_its_ties_as_training_does(tmp_path):
    from vipo_trl.testing import pickapic_dataset

    data = pickapic_dataset(4, ties=2)  # rows 4 and 5 tie; the red image wins every other row, on either side
    mapped = _rescore(tmp_path / "map", data, scorers=["test_redness"])
    streamed = _rescore(tmp_path / "stream", data.to_iterable_dataset(), scorers=["test_redness"])
    for result in (mapped, streamed):
        assert result.stats.skipped_rows == {"tie": 2} and result.stats.candidate_pairs == 4
        assert result.stats.consistency == 1.0 and result.stats.label_agreement == 1.0
    first_five = _rescore(tmp_path / "five", data, ["test_redness"], max_pairs=5)  # source rows 0-4: 4 pairs, a tie
    assert first_five.stats.skipped_rows == {"tie": 1} and first_five.dataset["source_row"] == [0, 1, 2, 3]


def test_rescoring_video_pairs_scores_frames_and_writes_mp4(tmp_path):
    from vipo_trl.data import decode_video
    from vipo_trl.testing import video_dataset

    # video_dataset's red clip wins every pair, and redness averaged over 3 frames of each clip agrees.
    result = _rescore(tmp_path / "v", video_dataset(2), scorers=["test_redness"], frames_scored=3)
    assert result.dataset["consistent"] == [True, True] and result.dataset["chosen_test_redness"][0] > 150
    frames = decode_video(result.dataset[0]["chosen"])
    assert len(frames) == 9 and frames[0].size == (16, 16)
    assert _channel_mean(frames[0], 0) > 150  # the red clip, re-encoded
    assert "text-to-video" in (tmp_path / "v" / "README.md").read_text()


@pytest.mark.slow
def test_pairs_command_keeps_the_consistent_pairs_of_an_embedded_set(tmp_path, capsys):
    """`default:noisy` (a third of its labels flipped against the shapes reward) filtered to the pairs the reward
    agrees with; the printed command trains the embedded model on them at its own size."""
    from vipo_trl.cli.main import main
    from vipo_trl.data import load_preference_dataset

    main(["pairs", "--dataset_name", "default:noisy", "--consistent_only", "--output_dir", str(tmp_path / "kept")])
    printed = capsys.readouterr().out
    stats = json.loads((tmp_path / "kept" / "pairs_stats.json").read_text())
    assert stats["pairs"] == round(stats["consistency"] * stats["candidate_pairs"]) > 0
    assert 0.2 < stats["consistency"] < 0.5  # noisy, as diagnose reports it
    kept = load_preference_dataset(str(tmp_path / "kept"))
    assert all(kept["consistent"]) and all(kept["label_agrees"])
    command = next(line for line in printed.splitlines() if line.startswith("train on it: "))
    assert "--resolution 32" in command and "vipo_trl/default/model" in command


def test_a_streamed_set_is_decoded_only_in_the_shards_a_process_makes(monkeypatch):
    """Under accelerate every process reads the stream, but decodes only its own shards' rows: the same items as the
    whole stream's, cut where a single process cuts them."""
    import vipo_trl.data.preference as preference
    import vipo_trl.eval.rescore as rescore_module
    from vipo_trl.data import DataOptions, pairs_from_options

    stream = pairs_from_options(_existing_set().to_iterable_dataset(), DataOptions(), 8)
    everything = dict(rescore_module._shards(stream, 2, None, todo=lambda shard: True))
    real, decoded = preference.load_pair, []

    def counting(row, row_index, *args, **kwargs):
        decoded.append(row_index)
        return real(row, row_index, *args, **kwargs)

    monkeypatch.setattr(preference, "load_pair", counting)
    mine = dict(rescore_module._shards(stream, 2, None, todo=lambda shard: shard % 2 == 1))  # process 1 of 2
    assert list(mine) == [1] and decoded == [2, 3]
    assert [item["row_index"] for item in mine[1]] == [item["row_index"] for item in everything[1]]
    assert [item["chosen"].tobytes() for item in mine[1]] == [item["chosen"].tobytes() for item in everything[1]]
    assert sum(len(items) for items in everything.values()) == len(_existing_set())  # a row, an item (or a reason)
