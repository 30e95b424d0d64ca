"""Writing video and audio samples to files a person can open: MP4 clips, frame strips, WAV
files, spectrograms."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from selfflow.io.audio import write_wav
from selfflow.io.safe_files import replace_atomically
from selfflow.io.video import write_mp4
from selfflow.sampling.writers import image_format, image_grid, to_uint8
from selfflow.tokenizers.audio import limit_peak

SPECTROGRAM_DB = (
    -80.0,
    0.0,
)  # every panel's colour range in dBFS (0 dB: a full-scale sine), fixed so panels compare


def save_video(frames: Tensor, path: str | os.PathLike, fps: float, upscale: int = 1) -> Path:
    """frames: [T, C, H, W] in [0, 1] (C = 1 or 3) -> an H.264 MP4 at `fps`, optionally upscaled by
    nearest neighbour so that small samples are visible in a player."""
    if frames.ndim != 4:
        raise ValueError(f"save_video expects frames [T, C, H, W], got {list(frames.shape)}")
    pixels = to_uint8(frames)  # [T, H, W, 3]
    if upscale > 1:
        pixels = pixels.repeat(upscale, axis=1).repeat(upscale, axis=2)
    return write_mp4(pixels, path, fps)


def save_frame_strip(frames: Tensor, path: str | os.PathLike, upscale: int = 1) -> Path:
    """frames: [T, C, H, W] (one row) or [B, T, C, H, W] (one row per clip) in [0, 1] -> a PNG of
    the frames."""
    if frames.ndim not in (4, 5):
        raise ValueError(
            f"save_frame_strip expects frames [T, C, H, W] or [B, T, C, H, "
            f"W], got {list(frames.shape)}"
        )
    clips = frames[None] if frames.ndim == 4 else frames
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replace_atomically(path) as file:
        frames = rearrange(clips, "b t c h w -> (b t) c h w")
        grid = image_grid(frames, nrow=clips.shape[1], upscale=upscale)
        grid.save(file, format=image_format(path))
    return path


def save_audio(wave: Tensor, path: str | os.PathLike, sample_rate: int) -> Path:
    """wave: [S] (or [1, S]) -> a 16-bit WAV file. A clip louder than -1 dBFS is scaled down
    to peak there (`limit_peak`), never clipped into a square wave; NaN/inf samples are
    written as silence."""
    wave = wave.reshape(-1) if wave.ndim == 2 and wave.shape[0] == 1 else wave
    return write_wav(limit_peak(wave.detach().float()), path, sample_rate)


def log_spectrogram(wave: Tensor, sample_rate: int) -> np.ndarray:
    """wave: [S] -> magnitudes [freq, frames] of a 32 ms-window STFT in dBFS (a full-scale sine
    peaks at 0 dB)."""
    n_fft = max(64, 1 << int(np.log2(sample_rate * 0.032)))
    window = torch.hann_window(n_fft)
    wave = torch.nan_to_num(wave.detach().float().cpu(), nan=0.0, posinf=0.0, neginf=0.0)
    spec = torch.stft(wave, n_fft, hop_length=n_fft // 4, window=window, return_complex=True)
    full_scale = window.sum() / 2  # the STFT magnitude of a sine of amplitude 1
    return (20 * torch.log10((spec.abs() / full_scale).clamp_min(1e-6))).numpy()


def save_spectrogram(
    wave: Tensor, path: str | os.PathLike, sample_rate: int, titles: list[str] | None = None
) -> Path:
    """wave: [S] (one panel) or [B, S] (one panel per clip, titled by `titles`) -> a PNG of the log
    spectrogram(s), time in seconds and frequency in Hz, every panel on the same fixed
    SPECTROGRAM_DB range, so a loud clip cannot darken the others and levels compare across panels
    and files."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    waves = wave.reshape(1, -1) if wave.ndim == 1 else wave
    if waves.ndim != 2:
        raise ValueError(
            f"save_spectrogram expects a wave [S] or waves [B, S], got {list(wave.shape)}"
        )
    columns = min(4, len(waves))
    rows = -(-len(waves) // columns)
    figure = Figure(figsize=(3.2 * columns, 2.4 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    seconds = waves.shape[-1] / sample_rate
    low, high = SPECTROGRAM_DB
    for i, one in enumerate(waves):
        axes = figure.add_subplot(rows, columns, i + 1)
        axes.imshow(
            log_spectrogram(one, sample_rate),
            origin="lower",
            aspect="auto",
            cmap="magma",
            vmin=low,
            vmax=high,
            extent=(0, seconds, 0, sample_rate / 2),
        )
        axes.set_xlabel("time (s)", fontsize=7)
        axes.set_ylabel("Hz", fontsize=7)
        axes.tick_params(labelsize=6)
        if titles is not None:
            axes.set_title(titles[i], fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replace_atomically(path) as file:
        figure.savefig(file, format=path.suffix.lstrip(".") or "png")
    return path
