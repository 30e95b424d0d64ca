"""Reading clips from video files (decord, PyAV as the fallback) and writing H.264 MP4 files (PyAV)."""
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

from selfflow.data.bad_files import UnusableSample

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")
VIDEO_BACKENDS = ("auto", "decord", "pyav")
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights for RGB -> grey


def clip_indices(total: int, num_frames: int, step: float, random_start: bool) -> np.ndarray:
    """Frame indices of one clip: `num_frames` frames `step` source frames apart, starting at a random frame
    (training) or centred in the video (evaluation)."""
    needed = math.floor((num_frames - 1) * step) + 1
    if total < needed:
        raise UnusableSample(f"video has {total} frames; a clip of {num_frames} frames {step:g} apart needs {needed}"
                             f" (lower data.train.num_frames or the frame stride)")
    room = total - needed
    first = float(torch.randint(0, room + 1, ())) if random_start else room / 2
    return np.minimum(np.floor(first + np.arange(num_frames) * step + 1e-6).astype(np.int64), total - 1)


def frame_step(source_fps: float, frame_stride: int, fps: float | None) -> float:
    """Source frames between two clip frames: `frame_stride`, or the ratio of the source rate to a target `fps`."""
    if fps is None:
        return float(frame_stride)
    if not source_fps or source_fps <= 0:
        raise UnusableSample("video has no frame rate; set data.train.fps=null and use frame_stride")
    return source_fps / fps


def _rewound(source: Path | BinaryIO) -> str | BinaryIO:
    """What a decoder opens: the path as text, or the in-memory file from its start (a fallback reads it again)."""
    if isinstance(source, Path):
        return str(source)
    source.seek(0)
    return source


def _read_decord(source: Path | BinaryIO, num_frames: int, frame_stride: int, fps: float | None,
                 random_start: bool) -> np.ndarray:
    import decord

    reader = decord.VideoReader(_rewound(source), num_threads=1)
    step = frame_step(reader.get_avg_fps(), frame_stride, fps)
    indices = clip_indices(len(reader), num_frames, step, random_start)
    return reader.get_batch(indices.tolist()).asnumpy()  # [T, H, W, 3] uint8


def _read_pyav(source: Path | BinaryIO, num_frames: int, frame_stride: int, fps: float | None,
               random_start: bool) -> np.ndarray:
    import av

    with av.open(_rewound(source)) as container:
        if not container.streams.video:
            raise UnusableSample("file has no video stream")
        stream = container.streams.video[0]
        step = frame_step(float(stream.average_rate or stream.guessed_rate or 0), frame_stride, fps)
        if stream.frames > 0:  # the container knows the length: decode only up to the last frame needed
            indices = clip_indices(stream.frames, num_frames, step, random_start)
            frames = []
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) > indices[-1]:
                    break
            if len(frames) <= indices[-1]:
                raise UnusableSample(f"video is truncated: the header promises {stream.frames} frames, "
                                     f"only {len(frames)} decode")
        else:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            indices = clip_indices(len(frames), num_frames, step, random_start)
    return np.stack([frames[i] for i in indices])


def clip_frames_available(path: str | os.PathLike, frame_stride: int = 1, fps: float | None = None) -> int:
    """How many clip frames a video holds at this stride or target rate, from its container header (PyAV, no
    decoding: the frame count, else duration x rate); 0 where the header does not say (the loader reports a bad
    file when it is drawn)."""
    import av

    try:
        with av.open(os.fspath(path)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            total = int(stream.frames)
            if total <= 0 and container.duration:  # containers without a frame count (e.g. WebM): from duration
                total = int(container.duration / 1_000_000 * rate)
            step = frame_step(rate, frame_stride, fps)
    except Exception:  # noqa: BLE001 - unreadable, no video stream, no rate: the loader says why
        return 0
    return math.floor((total - 1) / step) + 1 if total > 0 else 0


def decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def _byte_size(source: Path | BinaryIO) -> int:
    if isinstance(source, Path):
        return source.stat().st_size
    return source.seek(0, os.SEEK_END)


def read_clip(source: str | os.PathLike | BinaryIO, num_frames: int, frame_stride: int = 1, fps: float | None = None,
              random_start: bool = False, backend: str = "auto") -> np.ndarray:
    """One clip of a video file as uint8 RGB frames [T, H, W, 3], opening the file once.

    `source` is a path or a seekable binary file (e.g. a tar shard member's bytes in a BytesIO), decoded in memory.
    backend `auto` reads with decord and falls back to PyAV when decord is missing or fails on the file
    (decord 0.6 rejects some frame widths, e.g. 16 or 48 pixels, that PyAV decodes fine).
    """
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"video backend={backend!r} is unknown; choose one of {VIDEO_BACKENDS}")
    source = source if hasattr(source, "read") else Path(source)
    if _byte_size(source) == 0:
        raise UnusableSample("file is empty")
    args = (source, num_frames, frame_stride, fps, random_start)
    if backend == "pyav" or (backend == "auto" and not decord_available()):
        return _read_pyav(*args)
    try:
        return _read_decord(*args)
    except UnusableSample:
        raise
    except Exception as decord_error:  # noqa: BLE001 - any decord failure: PyAV may still read the file
        if backend == "decord" and isinstance(source, Path):
            raise
        if backend == "decord":  # decord's message on in-memory input quotes the input bytes: keep it short
            raise RuntimeError(f"decord cannot decode it: {str(decord_error)[:120]}") from None
        try:
            return _read_pyav(*args)
        except UnusableSample:
            raise
        except Exception as pyav_error:  # noqa: BLE001
            raise UnusableSample(f"neither decord ({type(decord_error).__name__}: {str(decord_error)[:120]}) nor "
                                 f"PyAV ({type(pyav_error).__name__}: {pyav_error}) can decode it") from pyav_error


def frames_to_tensor(frames: np.ndarray, image_size: int, channels: int) -> Tensor:
    """uint8 [T, H, W, 3] -> float [T, channels, S, S] in [0, 1]: grey or RGB, shorter side resized to S
    (antialiased), centre-cropped."""
    video = rearrange(torch.from_numpy(frames).float() / 255.0, "t h w c -> t c h w")
    if channels == 1:
        video = torch.einsum("tchw,c->thw", video, torch.tensor(LUMA))[:, None]
    h, w = video.shape[-2:]
    scale = image_size / min(h, w)
    size = (max(image_size, round(h * scale)), max(image_size, round(w * scale)))
    if size != (h, w):
        video = F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    return video[:, :, top:top + image_size, left:left + image_size].clamp(0, 1).contiguous()


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: float, crf: int = 12) -> Path:
    """uint8 RGB frames [T, H, W, 3] -> an H.264 MP4 (yuv420p; odd sides are padded by one edge pixel).

    crf: x264 quality, 0 lossless, 12 near-transparent, 23 the x264 default.
    """
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_mp4 expects uint8 frames [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    h, w = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001),
                                      options={"crf": str(crf)})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path
