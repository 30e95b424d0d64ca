"""Multi-aspect training: buckets, the bucket batch sampler, size/crop conditioning, sampling at a
bucket's size."""

from __future__ import annotations

import functools
import operator

import numpy as np
import pytest
import torch
from torch import nn

from selfflow.data.batching.buckets import (
    AspectBuckets,
    BucketBatchSampler,
    bucket_crop,
    make_buckets,
)
from selfflow.models.transformer import SelfFlowTransformer
from selfflow.sampling.generate import NoiseSource, sample_tokens
from selfflow.tokenizers.image import ImagePatchTokenizer
from selfflow.tokens import Condition, Tokens


def test_buckets_have_patch_multiple_sides_and_about_the_same_area():
    sizes = make_buckets(32, 4, max_aspect=2.0)
    assert (32, 32) in sizes and len(sizes) >= 5
    for h, w in sizes:
        assert h % 4 == 0 and w % 4 == 0 and 0.5 <= w / h <= 2.0
        assert 0.75 <= h * w / 32**2 <= 1.25
    with pytest.raises(ValueError, match="multiple of patch_size"):
        make_buckets(30, 4)


def test_bucketing_keeps_every_sample_aspect_within_its_bucket():
    rng = np.random.default_rng(0)
    shapes = [(int(h), int(w)) for h, w in rng.integers(20, 400, size=(300, 2))]
    buckets = AspectBuckets(make_buckets(32, 4))
    ids = [buckets.assign(h, w) for h, w in shapes]
    sampler = BucketBatchSampler(ids, batch_size=8, seed=1, drop_last=False)
    seen = []
    for batch in sampler:
        assert len({ids[i] for i in batch}) == 1  # one bucket per batch
        low, high = buckets.aspect_range(ids[batch[0]])
        assert all(low <= shapes[i][1] / shapes[i][0] <= high for i in batch)
        seen += batch
    assert sorted(seen) == list(range(300))  # every sample once per epoch
    assert list(sampler) == list(
        BucketBatchSampler(ids, 8, seed=1, drop_last=False)
    )  # a pure function of the seed
    sampler.set_epoch(1)
    assert list(sampler) != list(BucketBatchSampler(ids, 8, seed=1, drop_last=False))
    full = BucketBatchSampler(ids, 8, seed=1, drop_last=True)
    assert all(len(b) == 8 for b in full)
    ranks = [list(BucketBatchSampler(ids, 8, seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and not set(
        functools.reduce(operator.iadd, ranks[0], [])
    ) & set(functools.reduce(operator.iadd, ranks[1], []))


def test_bucket_crop_covers_the_bucket_and_reports_size_and_crop():
    crop = bucket_crop(40, 100, (16, 32))
    assert crop.resized == (16, 40) and crop.target == (
        16,
        32,
    )  # the smallest cover at the image's aspect
    assert crop.sizes.tolist() == [
        40,
        100,
        0,
        4,
        16,
        32,
    ]  # centre crop of 32 of the 40 columns starts at 4
    torch.manual_seed(0)
    lefts = {bucket_crop(40, 100, (16, 32), random_crop=True).left for _ in range(50)}
    assert lefts <= set(range(9)) and len(lefts) > 1


def test_a_size_conditioned_model_samples_at_any_bucket_size():
    torch.manual_seed(0)
    model = SelfFlowTransformer({"image": 4}, width=32, depth=2, heads=2, size_conditioning=True)
    for name, p in model.named_parameters():
        if "adaLN_modulation" in name or "final_layers" in name or "size_embedder" in name:
            nn.init.normal_(p, std=0.2)
    labels = torch.zeros(2, dtype=torch.long)
    for h, w in [(8, 16), (16, 8)]:
        tokenizer = ImagePatchTokenizer(patch_size=2, channels=1, image_size=(h, w))
        sizes = torch.tensor([[h, w, 0, 0, h, w], [2 * h, 2 * w, 1, 3, h, w]], dtype=torch.float32)
        out = sample_tokens(
            model,
            tokenizer,
            Condition(labels, sizes=sizes),
            steps=3,
            noise=NoiseSource(torch.Generator().manual_seed(0)),
        )
        assert tokenizer.decode(out.tokens).shape == (2, 1, h, w)
        same = sample_tokens(
            model,
            tokenizer,
            Condition(labels, sizes=sizes[:1].repeat(2, 1)),
            steps=3,
            noise=NoiseSource(torch.Generator().manual_seed(0)),
        )
        assert torch.equal(out.tokens[0], same.tokens[0]) and not torch.allclose(
            out.tokens[1], same.tokens[1]
        )
    with pytest.raises(ValueError, match="size_conditioning=true"):
        SelfFlowTransformer({"image": 4}, width=32, depth=2, heads=2)(
            Tokens(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), "image"),
            torch.zeros(1, 1),
            None,
            Condition(torch.zeros(1, dtype=torch.long), sizes=torch.zeros(1, 6)),
        )
