"""Video folder dataset: clips of `num_frames` frames as [T, C, S, S] in [0, 1], labelled like any
sample files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from torch import Tensor

from selfflow.data.batching.buckets import parse_lengths
from selfflow.data.folders.file_dataset import LabelledFileDataset
from selfflow.io.video import (
    MAX_CLIP_PIXELS,
    MAX_FRAME_PIXELS,
    VIDEO_BACKENDS,
    VIDEO_EXTENSIONS,
    clip_frames_available,
    frames_to_tensor,
    read_clip,
)


def check_clip_options(
    num_frames: int,
    frame_stride: int,
    fps: float | None,
    channels: int,
    backend: str,
    max_frame_pixels: int = MAX_FRAME_PIXELS,
    max_clip_pixels: int = MAX_CLIP_PIXELS,
) -> None:
    """Start-up errors for a video dataset's clip options, naming the key."""
    if channels not in (1, 3):
        raise ValueError(f"data.dataset.channels={channels} must be 1 (grey) or 3 (RGB)")
    if num_frames < 1 or frame_stride < 1 or (fps is not None and fps <= 0):
        raise ValueError(
            f"data.dataset.num_frames={num_frames}, frame_stride={frame_stride} and "
            f"fps={fps} must be positive"
        )
    if backend not in VIDEO_BACKENDS:
        raise ValueError(
            f"data.dataset.backend={backend!r} is unknown; choose one of {VIDEO_BACKENDS}"
        )
    if max_frame_pixels < 1 or max_clip_pixels < 1:
        raise ValueError(
            f"data.dataset.max_frame_pixels={max_frame_pixels} and "
            f"max_clip_pixels={max_clip_pixels} must be positive"
        )


class VideoFolder(LabelledFileDataset):
    """Videos under `root` (.mp4 .avi .mkv .webm .mov), labelled by class sub-folder, CSV `manifest`
    or file-name `name_pattern` + `label_field` (see `find_labelled_files`).

    A clip is `num_frames` frames, `frame_stride` source frames apart or resampled to `fps` when
    set; its start is random in training and centred in evaluation. Frames are resized (shorter
    side) and centre-cropped to `image_size`, grey when `channels=1`. Decoding runs in DataLoader
    workers; a video whose frames have more than `max_frame_pixels` pixels, or a clip more than
    `max_clip_pixels`, is skipped before it is decoded.

    frame_counts (length buckets, e.g. [4, 8, 16]; split train only): each video goes to the longest
    clip length it holds at this stride (`bucket_ids`, from the container headers);
    `dataset[BucketIndex(i)]` is a clip of that many frames, so a training batch (one bucket) wastes
    no tokens on padding; a plain index still gives `num_frames`.
    """

    length_bucket_key = (
        "frame_counts"  # the bucket lengths' config key, in the tokenizer's `at_length` unit
    )

    def __init__(
        self,
        root: str,
        split: str = "train",
        num_frames: int = 8,
        frame_stride: int = 1,
        fps: float | None = None,
        image_size: int = 32,
        channels: int = 3,
        test_fraction: float = 0.1,
        seed: int = 0,
        on_bad_file: str = "skip",
        manifest: str | None = None,
        name_pattern: str | None = None,
        label_field: str | None = None,
        backend: str = "auto",
        frame_counts: Sequence[int] | None = None,
        max_frame_pixels: int = MAX_FRAME_PIXELS,
        max_clip_pixels: int = MAX_CLIP_PIXELS,
    ):
        check_clip_options(
            num_frames, frame_stride, fps, channels, backend, max_frame_pixels, max_clip_pixels
        )
        counts = parse_lengths(frame_counts, self.length_bucket_key)
        if counts and any(count != int(count) for count in counts):
            raise ValueError(
                f"data.dataset.frame_counts={list(frame_counts)} must be whole numbers of frames"
            )
        # the test split stays `num_frames` frames
        self.frame_counts = (
            [int(count) for count in counts] if counts and split == "train" else None
        )
        files = self.find_files(
            root, split, VIDEO_EXTENSIONS, test_fraction, seed, manifest, name_pattern, label_field
        )
        super().__init__(files, on_bad_file)
        self.num_frames, self.frame_stride, self.fps = num_frames, frame_stride, fps
        self.image_size, self.channels, self.backend = image_size, channels, backend
        self.max_frame_pixels, self.max_clip_pixels = max_frame_pixels, max_clip_pixels
        self.random_start = split == "train"
        self.check_readable()

    def header_length(self, path: Path) -> float:
        """Clip frames the video holds at this stride or rate, from its container header."""
        return clip_frames_available(path, self.frame_stride, self.fps)

    def load_at_length(self, path: Path | BinaryIO, length: float) -> Tensor:
        """frames: [T = length, C, S, S] in [0, 1]"""
        frames = read_clip(
            path,
            int(length),
            self.frame_stride,
            self.fps,
            self.random_start,
            self.backend,
            self.max_frame_pixels,
            self.max_clip_pixels,
        )
        return frames_to_tensor(frames, self.image_size, self.channels)

    def load(self, path: Path | BinaryIO) -> Tensor:
        """frames: [T, C, S, S] in [0, 1], from a path or an open binary file (as
        VideoShards decodes)"""
        return self.load_at_length(path, self.num_frames)
