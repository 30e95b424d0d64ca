"""Audio folder dataset: mono clips [1, S] at one sample rate, of one length or in duration buckets, labelled like
any sample files."""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Sequence

import soundfile
from torch import Tensor

from selfflow.data.audio_io import AUDIO_EXTENSIONS, read_audio
from selfflow.data.buckets import BucketIndex
from selfflow.data.file_dataset import LabelledFileDataset
from selfflow.data.files import check_readable_file


def parse_durations(durations: Sequence[float] | None) -> list[float] | None:
    """`data.train.durations`: clip lengths in seconds for duration buckets, sorted; None (or empty) = off."""
    if durations is None or len(durations) == 0:
        return None
    values = sorted(float(d) for d in durations)
    if values[0] <= 0 or len(set(values)) != len(values):
        raise ValueError(f"data.train.durations={list(durations)} must be distinct positive seconds, e.g. [0.5,1,2]")
    return values


def header_seconds(path) -> float:
    """A recording's length in seconds from its header (0 where the header cannot be read: the loader reports the
    file when it is drawn)."""
    try:
        return float(soundfile.info(os.fspath(path)).duration)
    except Exception:  # noqa: BLE001 - a bad file is reported when it is loaded
        return 0.0


def duration_bucket(durations: Sequence[float], seconds: float) -> int:
    """The longest bucket a recording of `seconds` fills (cropped to it), or the shortest one (padded)."""
    fitting = [b for b, d in enumerate(durations) if d <= seconds + 1e-6]
    return fitting[-1] if fitting else 0


class AudioFolder(LabelledFileDataset):
    """Recordings under `root` (.wav .flac .ogg), labelled by class sub-folder, CSV `manifest` or file-name
    `name_pattern` + `label_field` (FSDD: `{digit}_{speaker}_{index}` with `digit` or `speaker`).

    Each item is `duration` seconds at `sample_rate`, mixed to mono, resampled when the file's rate differs,
    randomly cropped (training) or centred (evaluation), zero-padded when shorter.

    durations (duration buckets, e.g. [0.5, 1.0, 2.0] seconds): each recording goes to the longest bucket it fills
    (`bucket_ids`, from the headers); `dataset[BucketIndex(i)]` is cropped to that bucket's length, so a training
    batch (one bucket) wastes no tokens on padding; a plain index still gives `duration` seconds.
    """

    def __init__(self, root: str, split: str = "train", sample_rate: int = 8000, duration: float = 1.0,
                 resample: bool = True, min_peak: float = 1e-4, test_fraction: float = 0.1, seed: int = 0,
                 on_bad_file: str = "skip", manifest: str | None = None, name_pattern: str | None = None,
                 label_field: str | None = None, durations: Sequence[float] | None = None):
        if sample_rate <= 0 or duration <= 0:
            raise ValueError(f"data.train.sample_rate={sample_rate} and duration={duration} must be positive")
        files = self.find_files(root, split, AUDIO_EXTENSIONS, test_fraction, seed, manifest, name_pattern,
                                    label_field)
        super().__init__(files, on_bad_file)
        self.sample_rate, self.num_samples = int(sample_rate), round(sample_rate * duration)
        self.resample, self.min_peak = resample, min_peak
        self.random_crop = split == "train"
        self.durations = parse_durations(durations)
        self._bucket_ids: list[int] | None = None
        self.check_readable()

    @property
    def bucket_ids(self) -> list[int] | None:
        """Each recording's duration bucket (None without `durations`): the longest bucket it fills, from the file
        headers read once on first use; shorter recordings go to the shortest bucket (zero-padded)."""
        if self.durations is None:
            return None
        if self._bucket_ids is None:
            self._bucket_ids = [duration_bucket(self.durations, header_seconds(path)) for path in self.paths]
        return self._bucket_ids

    def load_item(self, i: int) -> Tensor:
        if self.durations is None or not isinstance(i, BucketIndex):
            return super().load_item(i)
        path = self.paths[i]
        check_readable_file(path)
        num_samples = round(self.durations[self.bucket_ids[i]] * self.sample_rate)
        return read_audio(path, self.sample_rate, num_samples, self.random_crop, self.resample, self.min_peak)

    def load(self, path: Path | BinaryIO) -> Tensor:
        """wave: [1, S], from a path or an open binary file (AudioShards decodes through read_audio too)"""
        return read_audio(path, self.sample_rate, self.num_samples, self.random_crop, self.resample, self.min_peak)
