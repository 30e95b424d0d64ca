"""Built-in image data: scikit-learn's 1,797 real 8x8 handwritten digits (ships with the package,
no download)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from selfflow.data.folders.files import split_indices


class DigitImages(Dataset):
    """Digits as float images [channels, image_size, image_size] in [0, 1] with labels 0-9.

    The 8x8 originals are upsampled (bilinear, antialiased) to `image_size`.
    """

    num_classes = 10
    class_names: ClassVar[list[str]] = [str(d) for d in range(10)]

    def __init__(
        self,
        split: str = "train",
        image_size: int = 16,
        channels: int = 1,
        test_fraction: float = 0.15,
        seed: int = 0,
    ):
        from sklearn.datasets import load_digits

        digits = load_digits()
        keep = split_indices(len(digits.target), split, test_fraction, seed)
        images = (
            torch.as_tensor(digits.images[keep], dtype=torch.float32)[:, None] / 16.0
        )  # [M, 1, 8, 8]
        if image_size != 8:
            images = F.interpolate(
                images,
                size=(image_size, image_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            ).clamp(0, 1)
        self.images = images.expand(-1, channels, -1, -1).contiguous()
        self.labels = torch.as_tensor(digits.target[keep], dtype=torch.long)
        self.image_size, self.channels = image_size, channels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])
