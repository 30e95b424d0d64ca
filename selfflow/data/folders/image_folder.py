"""Image folder dataset: class sub-folders of image files, decoded with PIL."""

from __future__ import annotations

import os
from typing import BinaryIO

import torch
from PIL import Image
from torch.utils.data import Dataset

from selfflow.data.batching.buckets import BucketIndex, BucketOptions, bucket_crop, parse_buckets
from selfflow.data.folders.adm_crop import adm_center_crop, check_crop
from selfflow.data.folders.files import find_labelled_files
from selfflow.io.bad_files import BadFilePolicy
from selfflow.io.images import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    draft_within,
    image_to_tensor,
    opened_image,
    read_image_size,
    to_8bit,
)


def load_image(
    source: str | os.PathLike | BinaryIO,
    image_size: int,
    channels: int,
    max_pixels: int = MAX_PIXELS,
    crop: str = "center",
) -> torch.Tensor:
    """Decode any PIL image mode, centre-crop the largest square and resize it: [C, S, S] in [0, 1]
    (`crop="adm"`: the ADM centre crop of ImageNet training instead, see `adm_center_crop`).

    `source` is a path or an open binary file; see `opened_image` and `draft_within` for what
    is refused.
    """
    with opened_image(source) as image:
        adm = (
            crop == "adm"
        )  # ADM's crop resizes from the full-scale image: no reduced-scale decoding
        draft_within(image, channels, None if adm else (image_size, image_size), max_pixels)
        if adm:
            return image_to_tensor(adm_center_crop(to_8bit(image, channels), image_size))
        image = to_8bit(image, channels)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        # crop and resize in one step: an extreme aspect ratio never blows up into a
        # huge intermediate
        return image_to_tensor(
            image.resize(
                (image_size, image_size), Image.BICUBIC, box=(left, top, left + side, top + side)
            )
        )


def load_image_in_bucket(
    path,
    size: tuple[int, int],
    channels: int,
    random_crop: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode like `load_image`, resize to cover the bucket `size` (h, w) and crop (`bucket_crop`):
    ([C, h, w] in [0, 1], sizes [6] = original h, w, crop top, left, target h, w)."""
    with opened_image(path) as image:
        crop = bucket_crop(image.height, image.width, size, random_crop)
        (resized_h, resized_w), (target_h, target_w) = crop.resized, crop.target
        draft_within(image, channels, (resized_w, resized_h), max_pixels)
        image = to_8bit(image, channels)
        # the crop box in the decoded image's pixels (a JPEG draft may have decoded it smaller)
        sx, sy = image.width / resized_w, image.height / resized_h
        box = (
            crop.left * sx,
            crop.top * sy,
            (crop.left + target_w) * sx,
            (crop.top + target_h) * sy,
        )
        return image_to_tensor(
            image.resize((target_w, target_h), Image.BICUBIC, box=box)
        ), crop.sizes


def check_image_options(channels: int, max_pixels: int) -> None:
    """Start-up errors for an image dataset's options, naming the key."""
    if channels not in (1, 3):
        raise ValueError(f"data.dataset.channels={channels} must be 1 (grey) or 3 (RGB)")
    if max_pixels < 1:
        raise ValueError(f"data.dataset.max_pixels={max_pixels} must be positive")


class ImageFolder(Dataset):
    """Images under `root` (see `find_labelled_files` for the layout) as [channels, S, S] in [0, 1]
    with labels.

    buckets (multi-aspect training, see `parse_buckets`): `dataset[BucketIndex(i)]` resizes and
    crops image i into the bucket nearest its aspect ratio (`bucket_ids[i]`) and adds `{"sizes":
    [6]}` (original size, crop offsets, bucket size) for the model's size conditioning; a plain
    index still gives the square image. hflip and buckets apply to split train only.
    bucket_multiple: the patch size that bucket sides must be multiples of. max_pixels: larger
    images (as decoded, see `draft_within`) are skipped before decoding.
    """

    find_files = staticmethod(find_labelled_files)  # captioned folders extend it

    def __init__(
        self,
        root: str,
        split: str = "train",
        image_size: int = 32,
        channels: int = 3,
        hflip: bool = False,
        test_fraction: float = 0.1,
        seed: int = 0,
        on_bad_file: str = "skip",
        buckets=None,
        bucket_multiple: int = 1,
        max_pixels: int = MAX_PIXELS,
        crop: str = "center",
    ):
        check_image_options(channels, max_pixels)
        files = self.find_files(root, split, IMAGE_EXTENSIONS, test_fraction, seed)
        self.paths, self.labels, self.class_names = files.paths, files.labels, files.class_names
        self.image_size, self.channels, self.max_pixels = image_size, channels, max_pixels
        self.crop = check_crop(crop)
        self.hflip = hflip and split == "train"
        self.bad_files = BadFilePolicy(on_bad_file)
        self.use_buckets(
            buckets if split == "train" else None, bucket_multiple
        )  # the test split stays square

    def use_buckets(self, buckets, multiple: int = 1) -> None:
        """Turn multi-aspect bucketing on (a `buckets:` setting) or off (None)."""
        self.bucketing: BucketOptions | None = (
            None if buckets is None else parse_buckets(buckets, multiple, self.image_size)
        )
        self._bucket_ids: list[int] | None = None

    @property
    def bucket_ids(self) -> list[int] | None:
        """Each sample's bucket (None without buckets), from the image headers read once on first
        use; a file whose header cannot be read goes to the squarest bucket and is reported when it
        fails to load."""
        if self.bucketing is None:
            return None
        if self._bucket_ids is None:
            buckets = self.bucketing.buckets
            ids = []
            for path in self.paths:
                try:
                    ids.append(buckets.assign(*read_image_size(path)))
                except Exception:
                    ids.append(buckets.assign(1, 1))
            self._bucket_ids = ids
        return self._bucket_ids

    def _load_in_bucket(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.bucketing.buckets.sizes[self.bucket_ids[i]]
        return load_image_in_bucket(
            self.paths[i], size, self.channels, self.bucketing.random_crop, self.max_pixels
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path, sizes = self.paths[i], None
        try:
            if self.bucketing is not None and isinstance(i, BucketIndex):
                image, sizes = self._load_in_bucket(i)
            else:
                image = load_image(path, self.image_size, self.channels, self.max_pixels, self.crop)
        except Exception as error:
            self.bad_files.handle(path, f"{type(error).__name__}: {error}")
            return None
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return (
            (image, self.labels[i]) if sizes is None else (image, self.labels[i], {"sizes": sizes})
        )
