"""Multi-aspect training: aspect-ratio buckets, resizing into a bucket with size/crop conditioning, and a batch
sampler whose batches each hold one bucket (so samples of a batch share a token grid and need no padding).

Buckets have about the same area (token count) and sides that are multiples of the patch size. A sample goes to
the bucket nearest to it in log aspect ratio, so its aspect lies between the midpoints to the neighbouring buckets.
For video and audio, the duration plays the part of the aspect (bucket on frames or seconds the same way).
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Sampler


def make_buckets(base_size: int, patch_size: int, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(h, w) sizes of about base_size^2 pixels, sides multiples of patch_size, aspects w/h in [1/max, max]."""
    if base_size % patch_size:
        raise ValueError(f"bucket base_size={base_size} must be a multiple of patch_size={patch_size}")
    area, sizes = base_size * base_size, set()
    for h in range(patch_size, 4 * base_size + 1, patch_size):
        w = max(patch_size, round(area / h / patch_size) * patch_size)
        if 1 / max_aspect <= w / h <= max_aspect:
            sizes.add((h, w))
    return sorted(sizes, key=lambda s: s[1] / s[0])


class AspectBuckets:
    """Assigns sizes (h, w) to the bucket of nearest log aspect ratio."""

    def __init__(self, sizes: Sequence[Sequence[int]]):
        if not sizes:
            raise ValueError("no bucket sizes given; list (h, w) pairs or use make_buckets(base_size, patch_size)")
        self.sizes = sorted({(int(h), int(w)) for h, w in sizes}, key=lambda s: s[1] / s[0])
        self.log_aspects = np.log([w / h for h, w in self.sizes])

    def __len__(self) -> int:
        return len(self.sizes)

    def assign(self, height: int, width: int) -> int:
        return int(np.argmin(np.abs(self.log_aspects - math.log(width / height))))

    def aspect_range(self, bucket: int) -> tuple[float, float]:
        """(lowest, highest) aspect w/h that `assign` puts into `bucket` (the midpoints to its neighbours)."""
        edges = np.concatenate([[-np.inf], (self.log_aspects[1:] + self.log_aspects[:-1]) / 2, [np.inf]])
        return float(np.exp(edges[bucket])), float(np.exp(edges[bucket + 1]))


def fit_to_bucket(image: Tensor, size: tuple[int, int], random_crop: bool = False) -> tuple[Tensor, Tensor]:
    """image: [C, H, W] -> ([C, h, w] resized to cover the bucket size and cropped, sizes [6]).

    sizes = (original h, original w, crop top, crop left, target h, target w) in pixels, the conditioning of
    `selfflow.models.size_conditioning` (crop offsets in the resized image).
    """
    _, height, width = image.shape
    target_h, target_w = size
    scale = max(target_h / height, target_w / width)
    resized_h, resized_w = max(target_h, round(height * scale)), max(target_w, round(width * scale))
    resized = F.interpolate(image[None], size=(resized_h, resized_w), mode="bilinear", antialias=True,
                            align_corners=False)[0]
    if random_crop:
        top = int(torch.randint(resized_h - target_h + 1, ()))
        left = int(torch.randint(resized_w - target_w + 1, ()))
    else:
        top, left = (resized_h - target_h) // 2, (resized_w - target_w) // 2
    crop = resized[:, top:top + target_h, left:left + target_w]
    return crop, torch.tensor([height, width, top, left, target_h, target_w], dtype=torch.float32)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, each from one bucket: per epoch, each bucket is shuffled and cut into batches,
    and the order of all batches is shuffled, both from (seed, epoch) alone. `drop_last` drops a bucket's partial
    batch. `rank`/`num_replicas` give each process every num_replicas-th batch."""

    def __init__(self, bucket_ids: Sequence[int], batch_size: int, seed: int = 0, drop_last: bool = True,
                 num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        self.bucket_ids = np.asarray(bucket_ids)
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for bucket in np.unique(self.bucket_ids):
            members = rng.permutation(np.flatnonzero(self.bucket_ids == bucket))
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size].tolist()
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        order = rng.permutation(len(batches))
        usable = len(batches) - len(batches) % self.num_replicas  # every rank gets the same number of batches
        return [batches[i] for i in order[:usable]][self.rank::self.num_replicas]

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)
