"""Audio folder dataset: mono clips [1, S] at one sample rate, of one length or in duration buckets,
labelled like any sample files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import soundfile
from torch import Tensor

from selfflow.data.batching.buckets import parse_lengths
from selfflow.data.folders.file_dataset import LabelledFileDataset
from selfflow.io.audio import AUDIO_EXTENSIONS, read_audio


class AudioFolder(LabelledFileDataset):
    """Recordings under `root` (.wav .flac .ogg), labelled by class sub-folder, CSV `manifest`
    or file-name `name_pattern` + `label_field` (FSDD: `{digit}_{speaker}_{index}` with `digit`
    or `speaker`).

    Each item is `duration` seconds at `sample_rate`, mixed to mono, resampled when the file's rate
    differs, randomly cropped (training) or centred (evaluation), zero-padded when shorter.

    durations (duration buckets, e.g. [0.5, 1.0, 2.0] seconds; split train only): each recording
    goes to the longest bucket it fills (`bucket_ids`, from the headers); `dataset[BucketIndex(i)]`
    is cropped to that bucket's length, so a training batch (one bucket) wastes no tokens on
    padding; a plain index still gives `duration` seconds.
    """

    length_bucket_key = (
        "durations"  # the bucket lengths' config key, in the tokenizer's `at_length` unit
    )

    def __init__(
        self,
        root: str,
        split: str = "train",
        sample_rate: int = 8000,
        duration: float = 1.0,
        resample: bool = True,
        min_peak: float = 1e-4,
        test_fraction: float = 0.1,
        seed: int = 0,
        on_bad_file: str = "skip",
        manifest: str | None = None,
        name_pattern: str | None = None,
        label_field: str | None = None,
        durations: Sequence[float] | None = None,
    ):
        if sample_rate <= 0 or duration <= 0:
            raise ValueError(
                f"data.dataset.sample_rate={sample_rate} and duration={duration} must be positive"
            )
        files = self.find_files(
            root, split, AUDIO_EXTENSIONS, test_fraction, seed, manifest, name_pattern, label_field
        )
        super().__init__(files, on_bad_file)
        self.sample_rate, self.num_samples = int(sample_rate), round(sample_rate * duration)
        self.resample, self.min_peak = resample, min_peak
        self.random_crop = split == "train"
        durations = parse_lengths(durations, self.length_bucket_key)
        self.durations = (
            durations if split == "train" else None
        )  # the test split stays `duration` seconds
        self.check_readable()

    def header_length(self, path: Path) -> float:
        """Seconds, from the header."""
        try:
            return float(soundfile.info(os.fspath(path)).duration)
        except Exception:
            return 0.0

    def load_at_length(self, path: Path | BinaryIO, length: float) -> Tensor:
        """wave: [1, round(length * sample_rate)]"""
        return self.clip(path, round(length * self.sample_rate))

    def load(self, path: Path | BinaryIO) -> Tensor:
        """wave: [1, S], from a path or an open binary file (AudioShards decodes through
        read_audio too)"""
        return self.clip(path, self.num_samples)

    def clip(self, path: Path | BinaryIO, num_samples: int) -> Tensor:
        return read_audio(
            path, self.sample_rate, num_samples, self.random_crop, self.resample, self.min_peak
        )
