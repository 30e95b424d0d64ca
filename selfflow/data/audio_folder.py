"""Audio folder dataset: fixed-length mono clips [1, S] at one sample rate, labelled like any sample files."""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from torch import Tensor

from selfflow.data.audio_io import AUDIO_EXTENSIONS, read_audio
from selfflow.data.file_dataset import LabelledFileDataset


class AudioFolder(LabelledFileDataset):
    """Recordings under `root` (.wav .flac .ogg), labelled by class sub-folder, CSV `manifest` or file-name
    `name_pattern` + `label_field` (FSDD: `{digit}_{speaker}_{index}` with `digit` or `speaker`).

    Each item is `duration` seconds at `sample_rate`, mixed to mono, resampled when the file's rate differs,
    randomly cropped (training) or centred (evaluation), zero-padded when shorter.
    """

    def __init__(self, root: str, split: str = "train", sample_rate: int = 8000, duration: float = 1.0,
                 resample: bool = True, min_peak: float = 1e-4, test_fraction: float = 0.1, seed: int = 0,
                 on_bad_file: str = "skip", manifest: str | None = None, name_pattern: str | None = None,
                 label_field: str | None = None):
        if sample_rate <= 0 or duration <= 0:
            raise ValueError(f"data.train.sample_rate={sample_rate} and duration={duration} must be positive")
        files = self.find_files(root, split, AUDIO_EXTENSIONS, test_fraction, seed, manifest, name_pattern,
                                    label_field)
        super().__init__(files, on_bad_file)
        self.sample_rate, self.num_samples = int(sample_rate), round(sample_rate * duration)
        self.resample, self.min_peak = resample, min_peak
        self.random_crop = split == "train"
        self.check_readable()

    def load(self, path: Path | BinaryIO) -> Tensor:
        """wave: [1, S], from a path or an open binary file (AudioShards decodes through read_audio too)"""
        return read_audio(path, self.sample_rate, self.num_samples, self.random_crop, self.resample, self.min_peak)
