"""Multi-aspect training: aspect-ratio buckets, resizing into a bucket with size/crop conditioning,
and a batch sampler whose batches each hold one bucket (so samples of a batch share a token grid and
need no padding).

Buckets have about the same area (token count) and sides that are multiples of the patch size. A
sample goes to the bucket nearest to it in log aspect ratio, so its aspect lies between the
midpoints to the neighbouring buckets. Audio and video bucket on length instead (`length_bucket`): a
recording or video goes to the longest bucket it fills (seconds, or clip frames), cropped to it, so
that no batch needs padding.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler


def make_buckets(base_size: int, patch_size: int, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(h, w) sizes of about base_size^2 pixels, sides multiples of patch_size, aspects w/h in
    [1/max, max]; every portrait size has its landscape twin."""
    if base_size % patch_size:
        raise ValueError(
            f"bucket base_size={base_size} must be a multiple of patch_size={patch_size}"
        )
    area, sizes = base_size * base_size, set()
    for h in range(patch_size, 4 * base_size + 1, patch_size):
        w = max(patch_size, round(area / h / patch_size) * patch_size)
        if 1 / max_aspect <= w / h <= max_aspect:
            sizes.update({(h, w), (w, h)})
    by_aspect: dict[
        tuple[int, int], tuple[int, int]
    ] = {}  # one size per aspect: the nearest to the area
    for h, w in sorted(sizes, key=lambda s: abs(s[0] * s[1] - area)):
        by_aspect.setdefault((h // math.gcd(h, w), w // math.gcd(h, w)), (h, w))
    return sorted(by_aspect.values(), key=lambda s: s[1] / s[0])


class AspectBuckets:
    """Assigns sizes (h, w) to the bucket of nearest log aspect ratio."""

    def __init__(self, sizes: Sequence[Sequence[int]]):
        if not sizes:
            raise ValueError(
                "no bucket sizes given; list (h, w) pairs or use "
                "make_buckets(base_size, patch_size)"
            )
        self.sizes = sorted({(int(h), int(w)) for h, w in sizes}, key=lambda s: s[1] / s[0])
        self.log_aspects = np.log([w / h for h, w in self.sizes])

    def __len__(self) -> int:
        return len(self.sizes)

    def assign(self, height: int, width: int) -> int:
        return int(np.argmin(np.abs(self.log_aspects - math.log(width / height))))

    def aspect_range(self, bucket: int) -> tuple[float, float]:
        """(lowest, highest) aspect w/h that `assign` puts into `bucket` (the midpoints to
        its neighbours)."""
        edges = np.concatenate(
            [[-np.inf], (self.log_aspects[1:] + self.log_aspects[:-1]) / 2, [np.inf]]
        )
        return float(np.exp(edges[bucket])), float(np.exp(edges[bucket + 1]))


@dataclass(frozen=True, kw_only=True)
class BucketCrop:
    """How an image of `original` (h, w) goes into a bucket of `target` (h, w): resized to `resized`
    (h, w), the smallest size that covers the target at the image's aspect, then cropped at (top,
    left) of the resized image."""

    original: tuple[int, int]
    resized: tuple[int, int]
    top: int
    left: int
    target: tuple[int, int]

    @property
    def sizes(self) -> Tensor:
        """[6] (original h, original w, crop top, crop left, target h, target w):
        `SizeEmbedder`'s input."""
        return torch.tensor(
            [*self.original, self.top, self.left, *self.target], dtype=torch.float32
        )


def bucket_crop(
    height: int, width: int, size: Sequence[int], random_crop: bool = False
) -> BucketCrop:
    """The resize and crop that put an image of (height, width) into a bucket of `size` (h, w); a
    random crop draws its offsets from torch's RNG (reproducible under the data order's seeding),
    else the centre."""
    target_h, target_w = int(size[0]), int(size[1])
    scale = max(target_h / height, target_w / width)
    resized_h, resized_w = max(target_h, round(height * scale)), max(target_w, round(width * scale))
    if random_crop:
        top = int(torch.randint(resized_h - target_h + 1, ()))
        left = int(torch.randint(resized_w - target_w + 1, ()))
    else:
        top, left = (resized_h - target_h) // 2, (resized_w - target_w) // 2
    return BucketCrop(
        original=(int(height), int(width)),
        resized=(resized_h, resized_w),
        top=top,
        left=left,
        target=(target_h, target_w),
    )


class BucketIndex(int):
    """A sample index asking a multi-aspect dataset for the sample in its bucket, with its sizes
    row. A plain int gets the usual square sample, so loaders that batch samples freely (probe,
    metrics, caches) keep working; the training loader's bucket batch sampler hands out
    BucketIndex keys."""

    def __repr__(self) -> str:
        return f"BucketIndex({int(self)})"


BUCKET_KEYS = ("base_size", "max_aspect", "sizes", "random_crop")


@dataclass(frozen=True)
class BucketOptions:
    """A dataset's multi-aspect setting: its buckets and whether the crop into a bucket
    is random."""

    buckets: AspectBuckets
    random_crop: bool = False


def _sizes_of_mapping(value: Mapping, multiple: int, base_size: int, name: str) -> list:
    """The bucket sizes a `buckets:` mapping gives: its `sizes`, or `make_buckets` of its base."""
    unknown = sorted(set(map(str, value)) - set(BUCKET_KEYS))
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown}; allowed: {', '.join(BUCKET_KEYS)}")
    if value.get("sizes") is not None:
        if value.get("base_size") is not None or value.get("max_aspect") is not None:
            raise ValueError(f"{name} gives both sizes and base_size/max_aspect; give one of them")
        return value["sizes"]
    base = int(value.get("base_size") or base_size)
    max_aspect = float(value.get("max_aspect") or 2.0)
    if max_aspect < 1:
        raise ValueError(
            f"{name}.max_aspect={max_aspect} must be >= 1 (the widest aspect w/h allowed)"
        )
    if base % multiple:
        raise ValueError(f"{name}.base_size={base} must be a multiple of the patch size {multiple}")
    return make_buckets(base, multiple, max_aspect)


def _checked_pairs(sizes, multiple: int, name: str, hint: str) -> list[tuple[int, int]]:
    """The sizes as (h, w) pairs of positive multiples of the patch size, one per aspect ratio."""
    pairs = []
    for size in sizes:
        if (
            isinstance(size, (str, bytes))
            or not isinstance(size, Sequence)
            or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
        ):
            raise ValueError(
                f"{name} size {size!r} is not a pair [h, w] of positive integers; {hint}"
            )
        if size[0] % multiple or size[1] % multiple:
            raise ValueError(
                f"{name} size [{size[0]}, {size[1]}] has a side that is not a multiple of the "
                f"patch size {multiple}; round it to a multiple (tokenizer.image.patch_size)"
            )
        pairs.append((int(size[0]), int(size[1])))
    if not pairs:
        raise ValueError(f"{name} lists no bucket sizes; {hint}")
    aspects = sorted(w / h for h, w in set(pairs))
    if any(math.isclose(a, b) for a, b in itertools.pairwise(aspects)):
        raise ValueError(
            f"{name} has two sizes of the same aspect ratio ({sorted(set(pairs))}); a bucket is an "
            f"aspect ratio, so keep one size per aspect"
        )
    return pairs


def parse_buckets(
    value: Any, multiple: int, base_size: int, name: str = "data.dataset.buckets"
) -> BucketOptions:
    """The `buckets:` option of a dataset config -> BucketOptions. `value` is a list of [h, w]
    sizes, or a mapping with `sizes` (such a list) or `base_size` (default: the dataset's image
    size) and `max_aspect` (default 2.0) for `make_buckets`, and `random_crop` (default false).
    Every side must be a multiple of `multiple` (the patch size).
    """
    hint = (
        f"use e.g. {name}={{base_size: 32, max_aspect: 2.0}} or {name}=[[32, 32], [24, 40], [40, "
        f"24]] (or null for square images only)"
    )
    random_crop = False
    if isinstance(value, Mapping):
        sizes = _sizes_of_mapping(value, multiple, base_size, name)
        random_crop = bool(value.get("random_crop", False))
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        sizes = value
    else:
        raise ValueError(f"{name}={value!r} is not a bucket setting; {hint}")
    return BucketOptions(AspectBuckets(_checked_pairs(sizes, multiple, name, hint)), random_crop)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, each from one bucket: per epoch, each bucket is shuffled and cut
    into batches, and the order of all batches is shuffled, both from (seed, epoch) alone.
    `drop_last` drops a bucket's partial batch. `rank`/`num_replicas` give each process every
    num_replicas-th batch."""

    def __init__(
        self,
        bucket_ids: Sequence[int],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ):
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
                batch = members[start : start + self.batch_size].tolist()
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        order = rng.permutation(len(batches))
        usable = (
            len(batches) - len(batches) % self.num_replicas
        )  # every rank gets the same number of batches
        return [batches[i] for i in order[:usable]][self.rank :: self.num_replicas]

    def num_batches(self) -> int:
        """This rank's batches per epoch (the same in every epoch: only the order changes)."""
        counts = np.unique(self.bucket_ids, return_counts=True)[1]
        total = int((counts // self.batch_size).sum())
        if not self.drop_last:
            total += int((counts % self.batch_size > 0).sum())
        return total // self.num_replicas

    def __len__(self) -> int:
        return self.num_batches()

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)


def parse_lengths(values: Sequence[float] | None, key: str) -> list[float] | None:
    """Bucket lengths (seconds or frames) from `data.dataset.<key>`, sorted; None (or empty)
    = off."""
    if values is None or len(values) == 0:
        return None
    lengths = sorted(float(v) for v in values)
    if lengths[0] <= 0 or len(set(lengths)) != len(lengths):
        raise ValueError(
            f"data.dataset.{key}={list(values)} must be distinct positive lengths, e.g. [0.5,1,2]"
        )
    return lengths


def length_bucket(lengths: Sequence[float], available: float) -> int:
    """The longest bucket a sample of `available` length fills (it is cropped to it), or the
    shortest (padded, or reported as too short by its loader)."""
    fitting = [b for b, length in enumerate(lengths) if length <= available + 1e-6]
    return fitting[-1] if fitting else 0
