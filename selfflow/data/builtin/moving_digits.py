"""Built-in video data: handwritten digits moving across a black canvas in one of several
directions, written once as MP4 files into a cache folder and read back through VideoFolder."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from selfflow.data.builtin.digits import DigitImages
from selfflow.data.folders.video_folder import VideoFolder
from selfflow.io.cache_folders import cached_folder
from selfflow.io.video import write_mp4

DECODE_THREADS = min(
    4, os.cpu_count() or 1
)  # clips encoded and decoded at once when made and preloaded

# (name, (dy, dx)) in pixels per frame and speed unit; names hold no '_', which separates
# file-name fields
DIRECTIONS = (
    ("right", (0, 1)),
    ("left", (0, -1)),
    ("down", (1, 0)),
    ("up", (-1, 0)),
    ("down-right", (1, 1)),
    ("down-left", (1, -1)),
    ("up-right", (-1, 1)),
    ("up-left", (-1, -1)),
)
LABELS = ("digit", "direction")
PRELOAD_BYTES = (
    256 * 2**20
)  # the most decoded clips a split keeps in memory (the default train split: 16 MB)
DECODED_SPLITS = 4  # the decoded splits a process keeps (oldest dropped first)
DECODED: dict[tuple, Tensor] = {}
NAME_PATTERN = "{digit}_{direction}_{index}"


def start_range(velocity: int, travel: int, room: int) -> tuple[int, int]:
    """Start positions along one axis that keep the digit inside the canvas for the whole clip."""
    if velocity > 0:
        return 0, room - travel
    if velocity < 0:
        return travel, room
    return 0, room


def render_clip(
    digits: list[np.ndarray],
    moves: list[tuple[int, int]],
    num_frames: int,
    canvas: int,
    speed: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Digits [D, D] in [0, 1] moving by `speed * move` per frame (brightest pixel wins): uint8 [T,
    canvas, canvas]."""
    size = digits[0].shape[0]
    room, travel = canvas - size, speed * (num_frames - 1)
    frames = np.zeros((num_frames, canvas, canvas), np.float32)
    for digit, (dy, dx) in zip(digits, moves):
        y0, x0 = (
            int(rng.integers(lo, hi + 1))
            for lo, hi in (start_range(dy, travel, room), start_range(dx, travel, room))
        )
        for t in range(num_frames):
            y, x = y0 + dy * speed * t, x0 + dx * speed * t
            np.maximum(
                frames[t, y : y + size, x : x + size],
                digit,
                out=frames[t, y : y + size, x : x + size],
            )
    return (frames * 255).round().astype(np.uint8)


def make_moving_digits(
    folder: Path,
    clips: dict[str, int],
    num_frames: int,
    canvas: int,
    digit_size: int,
    speed: int,
    directions: int,
    second_digit: bool,
    fps: float,
    seed: int,
) -> None:
    """`clips[split]` MP4s per split, named `{digit}_{direction}_{index}.mp4`; test clips use test
    digits only."""
    # (frames, path): drawn in order from each split's generator, then encoded in parallel
    rendered = []
    for split, count in clips.items():
        source = DigitImages(split, image_size=digit_size, channels=1, seed=seed)
        rng = np.random.default_rng([seed, split == "test"])
        for index in range(count):
            picks = rng.integers(0, len(source), 2)
            ways = rng.choice(directions, 2, replace=False)
            count_digits = 2 if second_digit else 1
            digits = [source.images[i, 0].numpy() for i in picks[:count_digits]]
            moves = [DIRECTIONS[w][1] for w in ways[:count_digits]]
            frames = render_clip(digits, moves, num_frames, canvas, speed, rng)
            name = f"{int(source.labels[picks[0]])}_{DIRECTIONS[ways[0]][0]}_{index:05d}.mp4"
            rendered.append((np.repeat(frames[..., None], 3, axis=-1), folder / split / name))
    with ThreadPoolExecutor(DECODE_THREADS) as pool:  # PyAV encodes without the GIL
        list(pool.map(lambda clip: write_mp4(*clip, fps, crf=8), rendered))


def check_motion(
    label: str, directions: int, digit_size: int, speed: int, num_frames: int, canvas: int
) -> None:
    """Start-up errors of the moving digits' options, naming the key."""
    if label not in LABELS:
        raise ValueError(f"data.dataset.label={label!r} is unknown; choose one of {LABELS}")
    if directions not in (4, 8):
        raise ValueError(
            f"data.dataset.directions={directions} must be 4 (axes) or 8 (axes and diagonals)"
        )
    if digit_size + speed * (num_frames - 1) > canvas:
        raise ValueError(
            f"a {digit_size}-pixel digit moving {speed} pixels a frame for {num_frames} frames "
            f"leaves a {canvas}-pixel canvas; lower speed or digit_size, or raise canvas_size"
        )


class MovingDigits(VideoFolder):
    """Clips [T, C, S, S] of a moving handwritten digit, labelled by `label`: `digit` (10 classes)
    or `direction` (`directions` = 4 or 8 classes), optionally with a second digit moving another
    way as a distractor.

    Rendered at `canvas_size` (default 32: H.264 prefers it to 16) and resized to `image_size` when
    read. Made on first use into `<cache_dir>/moving_digits/<parameters hash>` (a few seconds for
    thousands of clips).

    preload: decode every clip once when the split is opened and serve it from memory (at most
    PRELOAD_BYTES; larger splits are read clip by clip): the clips hold exactly `num_frames` frames,
    so a read is always the same, and training then spends no time decoding (a few seconds once,
    instead of a decode per clip per epoch).
    """

    def __init__(
        self,
        split: str = "train",
        label: str = "digit",
        num_frames: int = 8,
        image_size: int = 16,
        channels: int = 1,
        clips_train: int = 2000,
        clips_test: int = 400,
        canvas_size: int = 32,
        digit_size: int = 16,
        speed: int = 2,
        directions: int = 8,
        second_digit: bool = False,
        fps: float = 8.0,
        seed: int = 0,
        cache_dir: str | None = None,
        on_bad_file: str = "skip",
        backend: str = "auto",
        preload: bool = True,
    ):
        check_motion(label, directions, digit_size, speed, num_frames, canvas_size)
        clips = {"train": clips_train, "test": clips_test}
        parameters = {
            "version": 1,
            "clips": clips,
            "num_frames": num_frames,
            "canvas": canvas_size,
            "digit_size": digit_size,
            "speed": speed,
            "directions": directions,
            "second_digit": second_digit,
            "fps": fps,
            "seed": seed,
        }
        motion = (num_frames, canvas_size, digit_size, speed, directions, second_digit, fps, seed)
        root = cached_folder(
            "moving_digits",
            parameters,
            lambda folder: make_moving_digits(folder, clips, *motion),
            cache_dir,
        )
        super().__init__(
            str(root),
            split,
            num_frames=num_frames,
            image_size=image_size,
            channels=channels,
            on_bad_file=on_bad_file,
            name_pattern=NAME_PATTERN,
            label_field=label,
            backend=backend,
        )
        clip_bytes = num_frames * channels * image_size**2 * 4  # float32
        self.clips = self.decoded() if preload and len(self) * clip_bytes <= PRELOAD_BYTES else None

    def decoded(self) -> Tensor:
        """Every clip of the split: [N, T, C, S, S] float32 in [0, 1], decoded once per process (the
        training data, its probe and the reference classifiers of both labels share it; a clip that
        cannot be read is an error: the files are this class's own)."""
        names = tuple(p.name for p in self.paths)
        key = (
            str(self.paths[0].parent),
            names,
            self.num_frames,
            self.image_size,
            self.channels,
            self.backend,
        )
        if key not in DECODED:
            while len(DECODED) >= DECODED_SPLITS:
                DECODED.pop(next(iter(DECODED)))
            read = super().load_item
            with ThreadPoolExecutor(DECODE_THREADS) as pool:  # PyAV decodes without the GIL
                DECODED[key] = torch.stack(list(pool.map(read, range(len(self)))))
        return DECODED[key]

    def load_item(self, i: int) -> Tensor:
        return super().load_item(i) if self.clips is None else self.clips[i]
