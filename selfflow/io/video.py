"""Reading clips from video files and writing H.264 MP4 files, both with PyAV (FFmpeg, bundled in
its wheels)."""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from selfflow.io.bad_files import UnusableSample
from selfflow.io.safe_files import replace_atomically

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")
VIDEO_BACKENDS = ("auto", "pyav")  # data.dataset.backend: both name PyAV
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights for RGB -> grey
# defaults of data.dataset.max_frame_pixels / max_clip_pixels: 4K UHD frames; 32M pixels a clip (16
# frames of 1080p) hold about 100 MB of decoded uint8 frames per DataLoader worker
MAX_FRAME_PIXELS = 3840 * 2160
MAX_CLIP_PIXELS = 32 * 1024 * 1024


def clip_indices(total: int, num_frames: int, step: float, random_start: bool) -> np.ndarray:
    """Frame indices of one clip: `num_frames` frames `step` source frames apart, starting at a
    random frame (training) or centred in the video (evaluation)."""
    needed = math.floor((num_frames - 1) * step) + 1
    if total < needed:
        raise UnusableSample(
            f"video has {total} frames; a clip of {num_frames} frames {step:g} apart needs {needed}"
            f" (lower data.dataset.num_frames or the frame stride)"
        )
    room = total - needed
    first = float(torch.randint(0, room + 1, ())) if random_start else room / 2
    return np.minimum(
        np.floor(first + np.arange(num_frames) * step + 1e-6).astype(np.int64), total - 1
    )


def frame_step(source_fps: float, frame_stride: int, fps: float | None) -> float:
    """Source frames between two clip frames: `frame_stride`, or the ratio of the source rate to a
    target `fps`."""
    if fps is None:
        return float(frame_stride)
    if not source_fps or source_fps <= 0:
        raise UnusableSample(
            "video has no frame rate; set data.dataset.fps=null and use frame_stride"
        )
    return source_fps / fps


def _rewound(source: Path | BinaryIO) -> str | BinaryIO:
    """What PyAV opens: the path as text, or the in-memory file from its start (a second pass reads
    it again)."""
    if isinstance(source, Path):
        return str(source)
    source.seek(0)
    return source


def check_frame_size(
    width: int, height: int, num_frames: int, max_frame_pixels: int, max_clip_pixels: int
) -> None:
    """Refuse frames or a clip with more pixels than the limits, before they are decoded (a tiny
    file can hold a few huge frames: 8 frames of 4096x4096 in 49 KB would take 2 GB)."""
    if width <= 0 or height <= 0:
        raise UnusableSample("its video stream gives no frame size")
    if width * height > max_frame_pixels:
        raise UnusableSample(
            f"frames of {width}x{height} pixels are more than data.dataset.max_frame_pixels="
            f"{max_frame_pixels}; raise it to read such videos"
        )
    if num_frames * width * height > max_clip_pixels:
        raise UnusableSample(
            f"a clip of {num_frames} frames of {width}x{height} pixels is more than "
            f"data.dataset.max_clip_pixels={max_clip_pixels}; raise it or lower num_frames"
        )


def _checked_stream(container, num_frames: int, max_frame_pixels: int, max_clip_pixels: int):
    """The container's video stream, after `check_frame_size` on the frame size in its header."""
    if not container.streams.video:
        raise UnusableSample("file has no video stream")
    stream = container.streams.video[0]
    check_frame_size(
        stream.codec_context.width,
        stream.codec_context.height,
        num_frames,
        max_frame_pixels,
        max_clip_pixels,
    )
    return stream


def _decode_clip(
    container,
    indices: np.ndarray,
    total: int,
    limits: tuple[int, int, int],
) -> np.ndarray:
    """Decode up to the clip's last frame, converting only the clip's frames to RGB (memory does not
    grow with the video's length)."""
    wanted = set(indices.tolist())
    kept: dict[int, np.ndarray] = {}
    decoded = 0
    for index, frame in enumerate(container.decode(_checked_stream(container, *limits))):
        # the header may lie, or the size change
        check_frame_size(frame.width, frame.height, *limits)
        if index in wanted:
            kept[index] = frame.to_ndarray(format="rgb24")  # [H, W, 3] uint8
        decoded = index + 1
        if decoded > indices[-1]:
            break
    if decoded <= indices[-1]:
        raise UnusableSample(
            f"video is truncated: the header promises {total} frames, only {decoded} decode",
        )
    return np.stack([kept[i] for i in indices])


def _read_pyav(
    source: Path | BinaryIO,
    num_frames: int,
    frame_stride: int,
    fps: float | None,
    random_start: bool,
    max_frame_pixels: int,
    max_clip_pixels: int,
) -> np.ndarray:
    """One clip through one open container when its header counts the frames; a container without a
    frame count is decoded once to count them (keeping none), then opened again for the clip."""
    import av

    limits = (num_frames, max_frame_pixels, max_clip_pixels)
    with av.open(_rewound(source)) as container:
        stream = _checked_stream(container, *limits)
        step = frame_step(float(stream.average_rate or stream.guessed_rate or 0), frame_stride, fps)
        total = int(stream.frames)
        if total > 0:
            indices = clip_indices(total, num_frames, step, random_start)
            return _decode_clip(container, indices, total, limits)
        total = sum(1 for _ in container.decode(stream))
    indices = clip_indices(total, num_frames, step, random_start)
    with av.open(_rewound(source)) as container:
        return _decode_clip(container, indices, total, limits)


def clip_frames_available(
    path: str | os.PathLike, frame_stride: int = 1, fps: float | None = None
) -> int:
    """How many clip frames a video holds at this stride or target rate, from its container header
    (PyAV, no decoding: the frame count, else duration x rate); 0 where the header does not say (the
    loader reports a bad file when it is drawn)."""
    import av

    try:
        with av.open(os.fspath(path)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            total = int(stream.frames)
            if (
                total <= 0 and container.duration
            ):  # containers without a frame count (e.g. WebM): from duration
                total = int(container.duration / 1_000_000 * rate)
            step = frame_step(rate, frame_stride, fps)
    except Exception:
        return 0
    return math.floor((total - 1) / step) + 1 if total > 0 else 0


def _byte_size(source: Path | BinaryIO) -> int:
    if isinstance(source, Path):
        return source.stat().st_size
    return source.seek(0, os.SEEK_END)


def read_clip(
    source: str | os.PathLike | BinaryIO,
    num_frames: int,
    frame_stride: int = 1,
    fps: float | None = None,
    random_start: bool = False,
    backend: str = "auto",
    max_frame_pixels: int = MAX_FRAME_PIXELS,
    max_clip_pixels: int = MAX_CLIP_PIXELS,
) -> np.ndarray:
    """One clip of a video file as uint8 RGB frames [T, H, W, 3], decoded by PyAV (FFmpeg).

    Args:
        source: a path or a seekable binary file (e.g. a tar shard member's bytes in a BytesIO).
        num_frames: frames in the clip.
        frame_stride: source frames between two clip frames (when `fps` is None).
        fps: resample to this frame rate instead (None: use `frame_stride`).
        random_start: a random first frame (training) instead of the centred clip (evaluation).
        backend: `auto` or `pyav` (the same: PyAV is the one video library).
        max_frame_pixels, max_clip_pixels: a video whose frames (or clip) have more pixels is
            refused before it
            is decoded.

    Returns:
        uint8 array [T, H, W, 3].
    """
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"video backend={backend!r} is unknown; choose one of {VIDEO_BACKENDS}")
    source = source if hasattr(source, "read") else Path(source)
    if _byte_size(source) == 0:
        raise UnusableSample("file is empty")
    limits = (max_frame_pixels, max_clip_pixels)
    return _read_pyav(source, num_frames, frame_stride, fps, random_start, *limits)


def frames_to_tensor(frames: np.ndarray, image_size: int, channels: int) -> Tensor:
    """uint8 [T, H, W, 3] -> float [T, channels, S, S] in [0, 1]: grey or RGB, shorter side resized
    to S (antialiased), centre-cropped. Frame by frame: a float copy exists of one full-size frame
    at a time."""
    return torch.stack([_frame_to_tensor(frame, image_size, channels) for frame in frames])


def _frame_to_tensor(frame: np.ndarray, image_size: int, channels: int) -> Tensor:
    """uint8 [H, W, 3] -> float [channels, S, S] in [0, 1]"""
    image = rearrange(torch.from_numpy(frame).float() / 255.0, "h w c -> 1 c h w")
    if channels == 1:
        image = torch.einsum("bchw,c->bhw", image, torch.tensor(LUMA))[:, None]
    h, w = image.shape[-2:]
    scale = image_size / min(h, w)
    size = (max(image_size, round(h * scale)), max(image_size, round(w * scale)))
    if size != (h, w):
        image = F.interpolate(
            image, size=size, mode="bilinear", antialias=True, align_corners=False
        )
    top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    return image[0, :, top : top + image_size, left : left + image_size].clamp(0, 1)


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: float, crf: int = 12) -> Path:
    """uint8 RGB frames [T, H, W, 3] -> an H.264 MP4 (yuv420p; odd sides are padded by one
    edge pixel).

    crf: x264 quality, 0 lossless, 12 near-transparent, 23 the x264 default.
    """
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"write_mp4 expects uint8 frames [T, H, W, 3], got {frames.dtype} {list(frames.shape)}"
        )
    h, w = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replace_atomically(path) as file, av.open(file, mode="w", format="mp4") as container:
        stream = container.add_stream(
            "libx264", rate=Fraction(fps).limit_denominator(1001), options={"crf": str(crf)}
        )
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(
                stream.encode(
                    av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                )
            )
        container.mux(stream.encode())
    return path
