"""Image folder dataset: class sub-folders of image files, decoded with PIL."""
from __future__ import annotations

import os
import warnings
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from selfflow.data.bad_files import BadFilePolicy
from selfflow.data.files import check_readable_file, find_labelled_files

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


# 2x below PIL's own limit: far more pixels than any training image needs, far less memory than a bomb wants
MAX_PIXELS = 64_000_000


def to_8bit(image: Image.Image, channels: int) -> Image.Image:
    """RGB or L with 8 bits: 16-bit and float images rescaled (PIL's convert would clip them), transparency
    composited onto white, palette/CMYK/YCbCr/bilevel converted."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.float32)
        top = 1.0 if array.max(initial=0) <= 1.0 else 255.0 if array.max() <= 255 else 65535.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB" if channels == 3 else "L")


def load_image(source: str | os.PathLike | BinaryIO, image_size: int, channels: int,
               max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Decode any PIL image mode, centre-crop the largest square and resize it: [C, S, S] in [0, 1].

    `source` is a path or an open binary file (e.g. a tar shard member's bytes in a BytesIO). Refuses (raises)
    non-regular or empty files and images above `max_pixels` before decoding any pixel.
    """
    if isinstance(source, (str, os.PathLike)):
        check_readable_file(source)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as image:
            if image.width * image.height > max_pixels:
                raise ValueError(f"{image.width}x{image.height} pixels is more than max_pixels={max_pixels} "
                                 f"(a decompression bomb, or an image far larger than training needs)")
            image.draft("RGB" if channels == 3 else "L", (image_size, image_size))  # fast JPEG downscale
            image = to_8bit(image, channels)
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            # crop and resize in one step: an extreme aspect ratio never blows up into a huge intermediate
            image = image.resize((image_size, image_size), Image.BICUBIC, box=(left, top, left + side, top + side))
            array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageFolder(Dataset):
    """Images under `root` (see `find_labelled_files` for the layout) as [channels, S, S] in [0, 1] with labels."""

    def __init__(self, root: str, split: str = "train", image_size: int = 32, channels: int = 3,
                 hflip: bool = False, test_fraction: float = 0.1, seed: int = 0, on_bad_file: str = "skip"):
        if channels not in (1, 3):
            raise ValueError(f"channels={channels} must be 1 (grey) or 3 (RGB)")
        files = find_labelled_files(root, split, IMAGE_EXTENSIONS, test_fraction, seed)
        self.paths, self.labels, self.class_names = files.paths, files.labels, files.class_names
        self.image_size, self.channels = image_size, channels
        self.hflip = hflip and split == "train"
        self.bad_files = BadFilePolicy(on_bad_file)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            image = load_image(path, self.image_size, self.channels)
        except Exception as error:  # noqa: BLE001 - any decoder failure makes the file unusable
            self.bad_files.handle(path, f"{type(error).__name__}: {error}")
            return None
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, self.labels[i]
