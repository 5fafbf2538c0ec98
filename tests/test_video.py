"""Video pairs: mp4 files and bytes written with PyAV, decoded, sampled in time, and trained on with Wan2.1."""

import io

import av
import numpy as np
import pytest
from datasets import Dataset
from families import FAMILIES, assert_every_lora_b_moved, lora_b
from peft import LoraConfig

from vipo_trl import PolyDPOConfig, PolyDPOTrainer
from vipo_trl.data import DataOptions, PreferencePairs, decode_video, looks_like_video, resolve_columns


def write_mp4(frames: int = 12, fps: int = 8, size: int = 16, channel: int = 0) -> bytes:
    """An mp4 whose frame k has brightness 20 * k in one colour channel."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for k in range(frames):
            array = np.zeros((size, size, 3), np.uint8)
            array[..., channel] = 20 * k
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def brightness(frame, channel: int = 0) -> float:
    return float(np.asarray(frame, dtype=np.float32)[..., channel].mean())


def test_video_detection():
    clip = write_mp4()
    assert looks_like_video(clip) and looks_like_video("a/b.MP4") and looks_like_video({"bytes": clip, "path": None})
    assert not looks_like_video(b"\x89PNG\r\n\x1a\n") and not looks_like_video("x.png")


def test_decode_sample_by_count_and_fps(tmp_path):
    clip = write_mp4(frames=12, fps=8)
    path = tmp_path / "clip.mp4"
    path.write_bytes(clip)
    frames = decode_video(str(path), num_frames=5)
    assert len(frames) == 5 and frames[0].size == (16, 16)
    levels = [brightness(f) for f in frames]
    assert levels == sorted(levels) and levels[1] - levels[0] == pytest.approx(20, abs=6)  # consecutive frames
    at_4fps = [brightness(f) for f in decode_video(clip, num_frames=5, fps=4)]  # every other frame of an 8 fps clip
    assert at_4fps[1] - at_4fps[0] == pytest.approx(40, abs=8)
    assert len(decode_video(clip)) == 12
    with pytest.raises(ValueError, match="fewer than num_frames=9"):
        decode_video(clip, num_frames=9, fps=4)


def test_video_rows_become_pairs_and_short_videos_are_bad_rows(tmp_path):
    (tmp_path / "short.mp4").write_bytes(write_mp4(frames=4, channel=0))
    (tmp_path / "red.mp4").write_bytes(write_mp4(frames=12, channel=0))
    ds = Dataset.from_dict(
        {
            "prompt": ["too short", "a red clip"],
            "chosen": [str(tmp_path / "short.mp4"), str(tmp_path / "red.mp4")],  # files
            # bytes
            "rejected": [write_mp4(frames=4, channel=2), write_mp4(frames=12, channel=2)],
        }
    )
    data = PreferencePairs(ds, resolve_columns(ds.column_names), DataOptions(num_frames=9))
    item = data[0]
    assert item["row_index"] == 1 and item["skipped"] == [(0, "undecodable")]
    assert len(item["chosen"]) == len(item["rejected"]) == 9


def test_wan_trains_on_mp4_pairs(tmp_path):
    family = next(f for f in FAMILIES if f.name == "wan")
    family.build().save_pretrained(tmp_path / "wan")
    red, blue = write_mp4(frames=10, channel=0), write_mp4(frames=10, channel=2)
    ds = Dataset.from_dict({"prompt": ["a red clip"] * 4, "chosen": [red] * 4, "rejected": [blue] * 4})
    args = PolyDPOConfig(
        output_dir=str(tmp_path / "out"),
        resolution=16,
        num_frames=9,
        video_fps=8,
        per_device_train_batch_size=2,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        max_sequence_length=8,
    )
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=family.lora_targets)
    trainer = PolyDPOTrainer(str(tmp_path / "wan"), args, ds, peft_config=lora)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["pixel_values_chosen"].shape == (2, 3, 9, 16, 16)
    before = lora_b(trainer.model)
    trainer.train()
    assert all(np.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    assert_every_lora_b_moved(trainer.model, before)


def test_without_pyav_video_pairs_stop_with_the_extra_to_install(tmp_path, tiny_sd_path, monkeypatch, capsys):
    """A missing PyAV is not a bad row (every video row would be skipped as undecodable): it stops, naming the fix."""
    import sys

    from vipo_trl.cli import main
    from vipo_trl.data.video import MissingDependency

    clips = Dataset.from_dict({"prompt": ["a cat"] * 2, "chosen": [write_mp4()] * 2, "rejected": [write_mp4()] * 2})
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    data = PreferencePairs(clips, resolve_columns(clips.column_names), DataOptions(num_frames=4))
    with pytest.raises(MissingDependency, match=r"pip install 'vipo-trl\[video\]'"):
        data[0]
    clips.to_parquet(str(tmp_path / "clips.parquet"))
    with pytest.raises(SystemExit):
        main(["train", "--model_name_or_path", tiny_sd_path, "--dataset_name", str(tmp_path / "clips.parquet"),
              "--output_dir", str(tmp_path / "run"), "--report_to", "none", "--use_cpu", "true"])  # fmt: skip
    err = capsys.readouterr().err
    assert "vipo-trl: error: Decoding video files needs PyAV" in err and "Traceback" not in err, err
