"""Reading fixed-length mono clips from audio files (soundfile + torchaudio resampling) and writing
WAV files."""

from __future__ import annotations

import functools
import math
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
from torch import Tensor

from selfflow.io.bad_files import UnusableSample
from selfflow.io.safe_files import replace_atomically

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
TRUNCATED = re.compile(
    r"^data\s*:\s*\d+ \(should be", re.MULTILINE
)  # libsndfile's note on a short WAV data chunk
MAX_SAMPLE_RATE = (
    768_000  # Hz: no recorder writes more; a header above it is wrong, and the rate sizes the read
)
# bound on (source rate / gcd) x (target rate / gcd), about the size of the resampling filter
# in floats: every common pair is far below (11025 -> 16000 Hz: 441 x 640), an odd rate such as
# 44099 Hz would need 44099 x 8000 (1.4 GB)
MAX_RESAMPLING_FILTER = 1 << 20
READ_BLOCK_VALUES = (
    1 << 20
)  # samples (frames x channels) decoded at a time before they are mixed to mono


def resampling_rates(source_rate: int, target_rate: int) -> tuple[int, int]:
    """The rate pair the resampling filter is built for: the pair itself where its filter is small
    (every common pair), else the nearest ratio with a small filter (odd rates: a tempo change of
    about one part in a million)."""
    ratio = Fraction(source_rate, target_rate)
    if ratio.numerator * ratio.denominator <= MAX_RESAMPLING_FILTER:
        return source_rate, target_rate
    limit = max(1, math.isqrt(int(MAX_RESAMPLING_FILTER / ratio)))
    near = ratio.limit_denominator(limit)
    while limit > 1 and near.numerator * near.denominator > MAX_RESAMPLING_FILTER:
        limit //= 2
        near = ratio.limit_denominator(limit)
    return near.numerator, near.denominator


@functools.lru_cache(maxsize=16)
def resampler(source_rate: int, target_rate: int) -> torch.nn.Module:
    """A cached resampler (its filter is built once per rate pair), of bounded size
    (`resampling_rates`)."""
    import torchaudio  # here, not at import: image and video runs work without its native library

    return torchaudio.transforms.Resample(*resampling_rates(source_rate, target_rate))


def fit_length(wave: Tensor, num_samples: int, random_offset: bool) -> Tensor:
    """wave: [C, n] -> [C, num_samples]: cropped or zero-padded, at a random offset or centred."""
    excess = wave.shape[-1] - num_samples
    offset = int(torch.randint(0, abs(excess) + 1, ())) if random_offset else abs(excess) // 2
    if excess >= 0:
        return wave[..., offset : offset + num_samples]
    return F.pad(wave, (offset, -excess - offset))


def read_audio(
    source: str | os.PathLike | BinaryIO,
    sample_rate: int,
    num_samples: int,
    random_crop: bool = False,
    resample: bool = True,
    min_peak: float = 1e-4,
) -> Tensor:
    """A clip of `num_samples` samples at `sample_rate`, mixed to mono: [1, S] float.

    `source` is a path or an open binary file (e.g. a tar shard member's bytes in a BytesIO). Only
    the part of the file that the clip needs is read, a block at a time (memory does not grow with
    the channel count). A file that is empty, truncated, silent (peak below `min_peak`), holds
    non-finite samples, claims a rate above MAX_SAMPLE_RATE, or (with `resample=False`) has another
    rate raises UnusableSample.
    """
    with soundfile.SoundFile(source if hasattr(source, "read") else os.fspath(source)) as f:
        if f.frames <= 0:
            raise UnusableSample("file holds no audio frames")
        if TRUNCATED.search(f.extra_info):
            raise UnusableSample(
                "file is truncated: its header promises more audio than the file holds"
            )
        source_rate = f.samplerate
        if source_rate > MAX_SAMPLE_RATE:
            raise UnusableSample(
                f"its header claims {source_rate} Hz, above the {MAX_SAMPLE_RATE} Hz that any "
                f"recording uses (a broken or hostile header)"
            )
        if source_rate != sample_rate and not resample:
            raise UnusableSample(
                f"recorded at {source_rate} Hz, not {sample_rate} Hz (set "
                f"data.dataset.resample=true to resample)"
            )
        needed = math.ceil(num_samples * source_rate / sample_rate)
        room = max(0, f.frames - needed)
        start = int(torch.randint(0, room + 1, ())) if random_crop else room // 2
        f.seek(start)
        wave = _read_mono(f, min(needed, f.frames))[None]  # [1, n]
    peak = float(wave.abs().max())
    if peak < min_peak:
        raise UnusableSample(f"recording is silent (peak {peak:.2g} below min_peak={min_peak:g})")
    wave = fit_length(
        wave, needed, random_crop
    )  # one shape per rate pair: the resampling conv stays fast
    if source_rate != sample_rate:
        wave = fit_length(
            resampler(source_rate, sample_rate)(wave), num_samples, random_offset=False
        )
    return wave


def _read_mono(f: soundfile.SoundFile, frames: int) -> Tensor:
    """The next `frames` frames of `f` mixed to mono: [n] float32 (n < frames where the file
    ends early)."""
    block = max(1, READ_BLOCK_VALUES // f.channels)
    parts = []
    while frames > 0:
        audio = f.read(min(block, frames), dtype="float32", always_2d=True)  # [n, channels]
        if len(audio) == 0:
            break
        if not np.isfinite(audio).all():
            raise UnusableSample("file holds NaN or infinite samples")
        parts.append(torch.from_numpy(audio).mean(dim=1))
        frames -= len(audio)
    if not parts:
        raise UnusableSample("file holds no audio frames")
    return torch.cat(parts)


def write_wav(wave: np.ndarray | Tensor, path: str | os.PathLike, sample_rate: int) -> Path:
    """Mono samples [S] in [-1, 1] -> a 16-bit PCM WAV file (values outside [-1, 1] are clipped)."""
    samples = (
        wave.detach().float().cpu().numpy()
        if isinstance(wave, Tensor)
        else np.asarray(wave, np.float32)
    )
    if samples.ndim != 1:
        raise ValueError(f"write_wav expects mono samples [S], got shape {list(samples.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replace_atomically(path) as file:
        clipped = np.clip(samples, -1.0, 1.0)
        soundfile.write(file, clipped, int(sample_rate), subtype="PCM_16", format="WAV")
    return path
