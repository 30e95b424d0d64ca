"""Image folder dataset: class sub-folders of image files, decoded with PIL."""
from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from selfflow.data.bad_files import BadFilePolicy
from selfflow.data.files import find_labelled_files

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def load_image(path, image_size: int, channels: int) -> torch.Tensor:
    """Decode, convert to RGB or L, resize the shorter side to image_size and centre-crop: [C, S, S] in [0, 1]."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.draft("RGB" if channels == 3 else "L", (image_size, image_size))  # fast JPEG downscale
            image = image.convert("RGB" if channels == 3 else "L")
            scale = image_size / min(image.size)
            size = (max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale)))
            image = image.resize(size, Image.BICUBIC)
            left, top = (image.width - image_size) // 2, (image.height - image_size) // 2
            image = image.crop((left, top, left + image_size, top + image_size))
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
