"""Media writers (MP4, frame strip, WAV, spectrogram) read back from disk, and the sample callback
writing them during a tiny video_digits / audio_digits run."""

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from selfflow.sampling.media import save_audio, save_frame_strip, save_spectrogram, save_video
from selfflow.tokenizers.audio import PEAK_LIMIT
from selfflow.training.build import build_run
from tests.helpers.configs import compose_train


def read_mp4(path: Path) -> tuple[np.ndarray, float]:
    """uint8 [T, H, W, 3] frames and the frame rate, decoded with PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate)


def test_save_video_writes_an_h264_mp4_that_decodes_to_the_frames(tmp_path):
    levels = torch.linspace(0.1, 0.9, 6)
    frames = levels[:, None, None, None].expand(6, 3, 16, 24).clone()  # [T, C, H, W]
    path = save_video(frames, tmp_path / "out" / "clip.mp4", fps=12)
    decoded, fps = read_mp4(path)
    assert decoded.shape == (6, 16, 24, 3) and fps == 12
    np.testing.assert_allclose(decoded.mean(axis=(1, 2, 3)) / 255, levels.numpy(), atol=0.02)
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
    grey = save_video(
        torch.rand(4, 1, 7, 9), tmp_path / "odd.mp4", fps=8, upscale=2
    )  # odd sides are padded
    assert read_mp4(grey)[0].shape == (4, 14, 18, 3)
    with pytest.raises(ValueError, match=r"expects frames \[T, C, H, W\]"):
        save_video(torch.rand(2, 4, 1, 8, 8), tmp_path / "x.mp4", fps=8)


def test_save_frame_strip_lays_frames_out_in_rows(tmp_path):
    frames = torch.zeros(5, 1, 8, 8)
    frames[2] = 1.0
    one = Image.open(save_frame_strip(frames, tmp_path / "strip.png", upscale=2))
    assert one.size == ((5 * (8 + 2) + 2) * 2, (8 + 2 + 2) * 2)
    pixels = np.asarray(one)
    assert pixels[2 * 2 + 4, (2 + 2 * 10 + 4) * 2].tolist() == [255, 255, 255]  # frame 2 is white
    assert pixels[2 * 2 + 4, (2 + 1 * 10 + 4) * 2].tolist() == [0, 0, 0]
    many = Image.open(save_frame_strip(torch.rand(3, 5, 3, 8, 8), tmp_path / "strips.png"))
    assert many.size == (5 * 10 + 2, 3 * 10 + 2)


def test_save_audio_and_spectrogram(tmp_path):
    t = torch.arange(8000) / 8000
    wave = 0.5 * torch.sin(2 * torch.pi * 440 * t)
    path = save_audio(wave, tmp_path / "a" / "tone.wav", sample_rate=8000)
    samples, rate = soundfile.read(path, dtype="float32")
    assert (
        rate == 8000 and samples.shape == (8000,) and soundfile.info(str(path)).subtype == "PCM_16"
    )
    np.testing.assert_allclose(samples, wave.numpy(), atol=1 / 32767)
    for gain in (
        4,
        1e8,
    ):  # too loud: scaled down to peak at -1 dBFS, never clipped into a square wave
        loud = soundfile.read(
            save_audio(wave * gain, tmp_path / "loud.wav", 8000), dtype="float32"
        )[0]
        np.testing.assert_allclose(loud, wave.numpy() * PEAK_LIMIT / 0.5, atol=1 / 32767)
    broken = wave.clone()
    broken[:100] = float("nan")
    written = soundfile.read(save_audio(broken, tmp_path / "nan.wav", 8000), dtype="float32")[0]
    assert (written[:100] == 0).all() and np.allclose(
        written[100:], wave.numpy()[100:], atol=1 / 32767
    )
    png = Image.open(save_spectrogram(wave, tmp_path / "spec.png", 8000)).convert("RGB")
    assert png.width > 200 and png.height > 150
    assert (
        len(np.unique(np.asarray(png).reshape(-1, 3), axis=0)) > 20
    )  # a real plot, not a blank image
    panels = Image.open(
        save_spectrogram(
            torch.stack([wave, wave.roll(100)] * 3),
            tmp_path / "six.png",
            8000,
            titles=[f"clip {i}" for i in range(6)],
        )
    )
    assert panels.width > png.width and panels.height > png.height  # 4 columns, 2 rows


def test_a_loud_clip_does_not_black_out_the_other_spectrograms(tmp_path):
    """Every panel is drawn on the same fixed dBFS range: a quiet clip's panel is the same image
    whether its neighbour is a quiet clip or full-scale noise, and the quiet tone is visible."""
    t = torch.arange(8000) / 8000
    quiet = 0.05 * torch.sin(2 * torch.pi * 440 * t)
    with_loud = np.asarray(
        Image.open(
            save_spectrogram(
                torch.stack([quiet, torch.randn(8000) * 1e8]), tmp_path / "loud.png", 8000
            )
        ).convert("RGB")
    )
    with_quiet = np.asarray(
        Image.open(
            save_spectrogram(torch.stack([quiet, quiet]), tmp_path / "quiet.png", 8000)
        ).convert("RGB")
    )
    left = with_loud.shape[1] // 2  # the first of the two panels
    assert np.array_equal(with_loud[:, :left], with_quiet[:, :left])
    assert len(np.unique(with_quiet[:, :left].reshape(-1, 3), axis=0)) > 20


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment, overrides",
    [
        ("video_digits", ["data.dataset.clips_train=24", "data.dataset.clips_test=4"]),
        (
            "audio_digits",
            ["data.dataset.voices=[en+m1]", "data.dataset.takes=3", "data.dataset.test_takes=1"],
        ),
    ],
)
def test_sample_callback_writes_playable_media_in_a_tiny_run(
    experiment, overrides, tmp_path, monkeypatch
):
    if experiment == "audio_digits":
        pytest.importorskip("espeakng_loader")
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))
    cfg = compose_train(
        [f"experiment={experiment}", *overrides, "callbacks.samples.max_classes=3"],
        tmp_path / "run",
    )
    run = build_run(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    folder = tmp_path / "run" / "samples" / ("video" if experiment == "video_digits" else "audio")
    assert (folder / "final.png").is_file() and (folder / "step_0000002.png").is_file()
    assert Image.open(folder / "final.png").width > 32
    if experiment == "video_digits":
        clips = sorted((folder / "final").glob("*.mp4"))
        assert [p.name for p in clips] == ["0_0.mp4", "1_0.mp4", "2_0.mp4"]
        frames, fps = read_mp4(clips[0])
        assert frames.shape == (8, 64, 64, 3) and fps == 8  # 16x16 clips upscaled 4x for viewing
    else:
        waves = sorted((folder / "final").glob("*.wav"))
        assert [p.name for p in waves] == ["0_0.wav", "1_0.wav", "2_0.wav"]
        samples, rate = soundfile.read(waves[0])
        assert rate == 8000 and samples.shape == (8000,) and np.isfinite(samples).all()
    assert list(
        (tmp_path / "cache").iterdir()
    )  # the built-in data went to the cache, not the repository


def test_the_end_samples_are_the_last_steps_copied_when_that_step_just_made_them(
    tmp_path, monkeypatch
):
    from selfflow.training import callbacks

    calls = []
    sample = callbacks.generate
    monkeypatch.setattr(
        callbacks, "generate", lambda *args, **kwargs: calls.append(1) or sample(*args, **kwargs)
    )
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))
    cfg = compose_train(
        [
            "experiment=video_digits",
            "data.dataset.clips_train=24",
            "data.dataset.clips_test=4",
            "trainer.max_steps=2",
            "callbacks.samples.max_classes=2",
        ],
        tmp_path / "run",
    )
    run = build_run(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    folder = tmp_path / "run" / "samples" / "video"
    assert len(calls) == 1  # step 2 was sampled, the end was not sampled again
    assert (folder / "final.png").read_bytes() == (folder / "step_0000002.png").read_bytes()
    clips = sorted(p.name for p in (folder / "final").iterdir())
    assert (
        clips
        == ["0_0.mp4", "1_0.mp4"]
        == sorted(p.name for p in (folder / "step_0000002").iterdir())
    )
