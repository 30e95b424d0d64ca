"""Image files decoded with PIL: any mode to 8-bit RGB or grey, reduced-scale decoding where the
format allows, decompression bombs and oversized images refused before a pixel is decoded."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from selfflow.io.paths import check_readable_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


# the default of data.dataset.max_pixels, counted as decoded (a JPEG decodes at 1/2, 1/4 or 1/8
# scale when the target size allows, so large photos pass): decoding takes up to ~15 bytes a pixel
# (RGBA, 16-bit), ~250 MB per DataLoader worker at this limit
MAX_PIXELS = 4096 * 4096


def to_8bit(image: Image.Image, channels: int) -> Image.Image:
    """RGB or L with 8 bits: 16-bit and float images rescaled (PIL's convert would clip them),
    transparency composited onto white, palette/CMYK/YCbCr/bilevel converted."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.float32)
        top = 1.0 if array.max(initial=0) <= 1.0 else 255.0 if array.max() <= 255 else 65535.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB" if channels == 3 else "L")


@contextmanager
def opened_image(source: str | os.PathLike | BinaryIO) -> Iterator[Image.Image]:
    """The PIL image of `source` (a path, or an open binary file such as a tar shard member's
    bytes), refused before any pixel is decoded when the path is not a non-empty regular file or PIL
    sees a decompression bomb."""
    if isinstance(source, (str, os.PathLike)):
        check_readable_file(source)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as image:
            yield image


def draft_within(
    image: Image.Image, channels: int, size: tuple[int, int] | None, max_pixels: int
) -> None:
    """Have `image` decode at a reduced scale that still covers `size` (width, height) where the
    format allows (JPEG: 1/2, 1/4, 1/8; None: at full scale), then refuse it, before any pixel is
    decoded, if it would decode to more than `max_pixels`."""
    if size is not None:
        image.draft("RGB" if channels == 3 else "L", size)
    if image.width * image.height > max_pixels:
        raise ValueError(
            f"{image.width}x{image.height} pixels is more than "
            f"data.dataset.max_pixels={max_pixels}; raise it to read such images (a decompression "
            f"bomb, or an image far larger than training needs)"
        )


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit PIL image -> [C, H, W] float in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def read_image_size(path) -> tuple[int, int]:
    """(height, width) from the file's header alone, no pixel decoded (bucketing a whole folder
    at setup)."""
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", Image.DecompressionBombWarning
        )  # refused later, when it is loaded
        with Image.open(path) as image:
            return image.height, image.width
