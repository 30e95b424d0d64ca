"""One table of what each generated modality needs around the model: how its samples are written as
files a person can open, previewed in one picture, loaded back from a file (refinement), and asked
for at another size or length.

`MODALITIES[name]` is what selfflow-sample, the training sample callback and the
prompt-following judge use instead of branching on modality names. A new modality is one entry
here (and its tokenizer).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from selfflow.sampling import media, writers
from selfflow.tokenizers.base import Tokenizer


@dataclass(frozen=True, kw_only=True)
class ModalityIO:
    """What the code around the model does with one modality's decoded samples.

    write(samples, folder, names, tokenizer, upscale, pictures) -> {kind: [paths]}: a file per
    sample (and a picture of each sample where the file itself is not one, e.g. a spectrogram PNG
    beside a WAV, unless pictures=False). preview(samples, path, tokenizer, nrow, upscale, titles)
    -> path: one picture of many samples. load(path, tokenizer) -> one raw sample as
    `tokenizer.encode` takes it (after stacking).
    folder: where selfflow-sample writes the per-sample files; preview_name: its preview
    picture (None: none).
    length_option: the selfflow-sample key that asks for another size or length ("size",
    "duration", "frames").
    playable: a sample needs its own file to be seen or heard (a preview picture cannot show motion
    or sound).
    arrays: samples also go into `samples.npz` (uint8 [N, H, W, 3], what metric suites read).
    judged: a reference classifier can score samples (`selfflow-sample metrics=true`, the
    prompt-following judge).
    """

    write: Callable[..., dict[str, list[Path]]]
    preview: Callable[..., Path]
    load: Callable[[Path, Tokenizer], Tensor]
    folder: str
    preview_name: str | None
    length_option: str
    playable: bool
    arrays: bool
    judged: bool


def _write_images(
    samples: Tensor,
    folder: Path,
    names: list[str],
    tokenizer,
    upscale: int = 1,
    pictures: bool = True,
):
    return {"images": writers.save_image_files(samples, folder, names, upscale)}


def _write_videos(
    samples: Tensor,
    folder: Path,
    names: list[str],
    tokenizer,
    upscale: int = 1,
    pictures: bool = True,
):
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "videos": [
            media.save_video(clip, folder / f"{name}.mp4", tokenizer.fps, upscale)
            for clip, name in zip(samples, names)
        ]
    }


def _write_audio(
    samples: Tensor,
    folder: Path,
    names: list[str],
    tokenizer,
    upscale: int = 1,
    pictures: bool = True,
):
    folder.mkdir(parents=True, exist_ok=True)
    rate = tokenizer.sample_rate
    files = {
        "audio": [
            media.save_audio(wave, folder / f"{name}.wav", rate)
            for wave, name in zip(samples, names)
        ]
    }
    if pictures:
        files["spectrograms"] = [
            media.save_spectrogram(wave, folder / f"{name}.png", rate)
            for wave, name in zip(samples, names)
        ]
    return files


def _preview_images(
    samples: Tensor,
    path: Path,
    tokenizer,
    nrow: int | None = None,
    upscale: int = 1,
    titles: list[str] | None = None,
) -> Path:
    return writers.save_image_grid(samples, path, nrow=nrow, upscale=upscale)


def _preview_videos(
    samples: Tensor,
    path: Path,
    tokenizer,
    nrow: int | None = None,
    upscale: int = 1,
    titles: list[str] | None = None,
) -> Path:
    return media.save_frame_strip(samples, path, upscale=upscale)  # one row of frames per clip


def _preview_audio(
    samples: Tensor,
    path: Path,
    tokenizer,
    nrow: int | None = None,
    upscale: int = 1,
    titles: list[str] | None = None,
) -> Path:
    return media.save_spectrogram(samples, path, tokenizer.sample_rate, titles=titles)


def _load_image(path: Path, tokenizer) -> Tensor:
    from selfflow.data.folders.image_folder import load_image

    height, width = tokenizer.image_size
    if height != width:
        raise ValueError(
            f"init images are loaded square; this tokenizer makes {height}x{width} images"
        )
    return load_image(path, height, tokenizer.channels)  # [C, S, S]


def _load_video(path: Path, tokenizer) -> Tensor:
    from selfflow.io.video import frames_to_tensor, read_clip

    return frames_to_tensor(
        read_clip(path, tokenizer.num_frames, fps=tokenizer.fps),
        tokenizer.image_size,
        tokenizer.channels,
    )  # [T, C, S, S]


def _load_audio(path: Path, tokenizer) -> Tensor:
    from selfflow.io.audio import read_audio

    return read_audio(path, tokenizer.sample_rate, tokenizer.num_samples)  # [1, S]


MODALITIES: dict[str, ModalityIO] = {
    "image": ModalityIO(
        write=_write_images,
        preview=_preview_images,
        load=_load_image,
        folder="images",
        preview_name="grid.png",
        length_option="size",
        playable=False,
        arrays=True,
        judged=True,
    ),
    "video": ModalityIO(
        write=_write_videos,
        preview=_preview_videos,
        load=_load_video,
        folder="videos",
        preview_name="contact_sheet.png",
        length_option="frames",
        playable=True,
        arrays=False,
        judged=False,
    ),
    "audio": ModalityIO(
        write=_write_audio,
        preview=_preview_audio,
        load=_load_audio,
        folder="audio",
        preview_name=None,
        length_option="duration",
        playable=True,
        arrays=False,
        judged=True,
    ),
}


def modality_io(modality: str) -> ModalityIO:
    if modality not in MODALITIES:
        raise ValueError(
            f"no sample files are defined for modality {modality!r}; known: {sorted(MODALITIES)}"
        )
    return MODALITIES[modality]


def load_init(path: str | os.PathLike, tokenizer: Tokenizer) -> Tensor:
    """One sample from a file, shaped for `tokenizer.encode` after stacking: an image, a video clip
    or a recording."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"init={path} does not exist; pass the path of a {tokenizer.modality} file to refine"
        )
    return modality_io(tokenizer.modality).load(path, tokenizer)


def image_tokenizer_at_size(tokenizer, size) -> Any:
    """The pixel tokenizer that generates images of `size` [H, W] (or S for S x S) pixels
    (whole patches)."""
    from selfflow.tokenizers.image import ImagePatchTokenizer

    values = list(size) if isinstance(size, (list, tuple)) else [size, size]
    if len(values) != 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values
    ):
        raise ValueError(
            f"size={values if len(values) != 2 else size} must be [height, width] in "
            f"pixels, e.g. size=[24,40]"
        )
    if type(tokenizer) is not ImagePatchTokenizer:
        raise ValueError(
            f"size= is for pixel-space image checkpoints; this one samples images with "
            f"{type(tokenizer).__name__}, at its trained size only"
        )
    (height, width), patch = values, tokenizer.patch_size
    if height % patch or width % patch:
        near = [-(-v // patch) * patch for v in (height, width)]  # rounded up
        raise ValueError(
            f"size=[{height}, {width}] must be whole patches: multiples of the checkpoint's "
            f"tokenizer.image.patch_size={patch}, e.g. size=[{near[0]},{near[1]}]"
        )
    return ImagePatchTokenizer(patch, tokenizer.channels, (height, width))


LENGTH_UNITS = {"duration": "seconds, e.g. duration=2.0", "frames": "frames, e.g. frames=16"}


def tokenizer_at_length(tokenizer, modality: str, options: dict[str, Any]) -> Any:
    """The tokenizer that generates `modality` at the size or length an option asks for (`size=[H,
    W]` images, `duration=` seconds of audio, `frames=` video frames; None keeps the trained one).
    An option meant for another modality is refused."""
    for option, value in options.items():
        if value is None:
            continue
        wanted = next(m for m, io in MODALITIES.items() if io.length_option == option)
        if modality != wanted:
            raise ValueError(f"{option}= is for {wanted} checkpoints; this one samples {modality}")
        if option == "size":
            return image_tokenizer_at_size(tokenizer, value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(
                f"{option}={value!r} must be a positive number of {LENGTH_UNITS[option]}"
            )
        if not hasattr(tokenizer, "at_length"):
            raise ValueError(
                f"{option}= is for {wanted} checkpoints with a pixel or log-mel tokenizer; this "
                f"one samples {modality} with {type(tokenizer).__name__}, "
                f"at its trained length only"
            )
        try:
            return tokenizer.at_length(value)
        except ValueError as error:
            raise ValueError(f"{option}={value}: {error}") from None
    return tokenizer
