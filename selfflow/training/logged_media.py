"""Sample files to the experiment trackers: every picture, clip and recording the sample callback
writes also goes to the active loggers at the training step it was made at, by file type (one table,
whatever the modality): wandb as `Image` / `Video` / `Audio`, TensorBoard as `add_image` / an
animated GIF (what `add_video` writes, made with Pillow since `add_video` needs moviepy) /
`add_audio`. CSV logs no media."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))  # [H, W, 3] uint8


def _tensorboard_image(writer, tag: str, path: Path, step: int) -> None:
    writer.add_image(tag, _read_png(path), step, dataformats="HWC")


def _tensorboard_video(writer, tag: str, path: Path, step: int) -> None:
    import av
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 8)
        frames = [
            Image.fromarray(frame.to_ndarray(format="rgb24")) for frame in container.decode(stream)
        ]
    gif = io.BytesIO()
    frames[0].save(
        gif,
        format="GIF",
        save_all=True,
        append_images=frames[1:],
        duration=round(1000 / fps),
        loop=0,
    )
    image = Summary.Image(
        height=frames[0].height,
        width=frames[0].width,
        colorspace=3,
        encoded_image_string=gif.getvalue(),
    )
    writer._get_file_writer().add_summary(
        Summary(value=[Summary.Value(tag=tag, image=image)]), step
    )


def _tensorboard_audio(writer, tag: str, path: Path, step: int) -> None:
    import soundfile

    wave, rate = soundfile.read(path, dtype="float32", always_2d=True)  # [S, channels]
    writer.add_audio(tag, wave.mean(axis=1)[None], step, sample_rate=rate)  # [1, S]


@dataclass(frozen=True)
class MediaKind:
    """How one file type is shown: the wandb class (`wandb.<name>(path)`) and TensorBoard's writer
    of it."""

    wandb_class: str
    tensorboard: Callable[..., None]
    clip: bool  # one file per sample (logged up to `max_clips`), not a picture of many


MEDIA_KINDS = {
    ".png": MediaKind("Image", _tensorboard_image, clip=False),
    ".mp4": MediaKind("Video", _tensorboard_video, clip=True),
    ".wav": MediaKind("Audio", _tensorboard_audio, clip=True),
}


def log_sample_files(
    loggers: Sequence[Logger], key: str, step: int, files: Sequence[Path], max_clips: int = 8
) -> None:
    """Send `files` (a preview picture and the clips of one modality) to every wandb and TensorBoard
    logger under `key` (e.g. samples/audio) at `step`: pictures all, per-sample clips the first
    `max_clips` of each type."""
    chosen: dict[str, list[Path]] = {}
    for path in map(Path, files):
        kind = MEDIA_KINDS.get(path.suffix.lower())
        if kind is not None and (
            not kind.clip or len(chosen.get(path.suffix.lower(), [])) < max_clips
        ):
            chosen.setdefault(path.suffix.lower(), []).append(path)
    for logger in loggers:
        for suffix, paths in chosen.items():
            kind = MEDIA_KINDS[suffix]
            tag = f"{key}/clips" if kind.clip else key
            if isinstance(logger, WandbLogger):
                import wandb

                media = [getattr(wandb, kind.wandb_class)(str(p), caption=p.stem) for p in paths]
                logger.log_metrics({tag: media}, step=step)
            elif isinstance(logger, TensorBoardLogger):
                for path in paths:
                    kind.tensorboard(
                        logger.experiment,
                        f"{tag}/{path.stem}" if len(paths) > 1 else tag,
                        path,
                        step,
                    )
