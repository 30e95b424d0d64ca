"""Image batches for the standard metrics, uint8 [B, H, W, 3]: streamed from an .npz (`arr_0`, the
ADM suite's and selfflow-sample's format) or read from a folder of image files.

A folder's images are taken as they are when they have the evaluation size; any other image gets
ADM's centre crop to that size (guided-diffusion `center_crop_arr`, with which its ImageNet
reference batches were made): box-filter halving while the short side is at least twice the size,
bicubic resize of the short side to the size, centre crop.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfflow.data.folders.adm_crop import adm_center_crop
from selfflow.data.folders.files import files_below
from selfflow.io.images import IMAGE_EXTENSIONS, MAX_PIXELS, opened_image, to_8bit
from selfflow.io.npz import ArrayHeader, iter_rows, npz_header

IMAGES_KEY = "arr_0"
MAX_IMAGES = (
    1_000_000  # far above the 50,000 of FID-50K; bounds what a file's header may make us allocate
)


@dataclass
class ImageSource:
    """N images of one size (h, w) and a way to read them in batches."""

    name: str
    count: int
    size: tuple[int, int]
    batches: Callable[[int], Iterator[np.ndarray]]  # batch_size -> uint8 [B, h, w, 3] blocks


def check_images_header(path: str | os.PathLike, header: ArrayHeader) -> ArrayHeader:
    """arr_0 must be uint8 [N, H, W, 3] with sizes in bounds, checked before any pixel is read."""
    shape = header.shape
    if len(shape) != 4 or shape[3] != 3 or header.dtype != np.uint8:
        raise ValueError(
            f"{path}[{IMAGES_KEY}] is {header.dtype} {list(shape)}; images must be uint8 [N, H, W, "
            f"3] (RGB, 0..255), as selfflow-sample's samples.npz and the ADM "
            f"reference batches store them"
        )
    if not 1 <= shape[0] <= MAX_IMAGES or shape[1] * shape[2] > MAX_PIXELS or min(shape[1:3]) < 1:
        raise ValueError(
            f"{path}[{IMAGES_KEY}] claims {shape[0]} images of {shape[1]}x{shape[2]} pixels; "
            f"between 1 and {MAX_IMAGES} images of at most {MAX_PIXELS} pixels are accepted"
        )
    return header


def npz_images(path: str | os.PathLike) -> ImageSource:
    header = check_images_header(path, npz_header(path, IMAGES_KEY))
    return ImageSource(
        str(path),
        header.shape[0],
        header.shape[1:3],
        lambda batch_size: iter_rows(path, IMAGES_KEY, batch_size, header),
    )


def read_rgb(path: Path, size: tuple[int, int]) -> np.ndarray:
    """One file as uint8 [h, w, 3]: as it is at that size, else ADM's centre crop to it (square
    sizes only)."""
    try:
        with opened_image(path) as image:
            image = to_8bit(image, 3)
            if (image.height, image.width) == size:
                return np.asarray(image)
            if size[0] != size[1]:
                raise ValueError(
                    f"it is {image.height}x{image.width}, and ADM's centre crop makes square "
                    f"images only: resize the folder to {size[0]}x{size[1]} first"
                )
            return np.asarray(adm_center_crop(image, size[0]))
    except (OSError, ValueError) as error:
        raise ValueError(f"reference image {path} cannot be used: {error}") from None


def folder_images(root: str | os.PathLike, size: tuple[int, int] | None) -> ImageSource:
    """The images below `root` (recursively, sorted by path) at `size` (h, w); None = the first
    image's size."""
    root = Path(root).expanduser()
    paths = files_below(root, IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"ref={root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    if len(paths) > MAX_IMAGES:
        raise ValueError(f"ref={root} holds {len(paths)} images; at most {MAX_IMAGES} are accepted")
    if size is None:
        with opened_image(paths[0]) as first:
            size = (first.height, first.width)

    def batches(batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(paths), batch_size):
            yield np.stack([read_rgb(path, size) for path in paths[start : start + batch_size]])

    return ImageSource(str(root), len(paths), size, batches)
