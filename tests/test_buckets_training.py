"""Multi-aspect training wired end to end: bucketed image folders, one-bucket batches that
resume exactly, the size-conditioning start-up check, `selfflow-train` with buckets and
`selfflow-sample size=[H,W]`."""

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import selfflow.data.folders.image_folder as image_folder
from selfflow.data.batching.buckets import BucketIndex, bucket_crop, make_buckets, parse_buckets
from selfflow.data.batching.collate import collate_samples
from selfflow.data.batching.order import ResumableBucketBatchSampler
from selfflow.data.batching.rng_state import mix_seed
from selfflow.data.folders.captions import CaptionedImageFolder
from selfflow.data.folders.image_folder import ImageFolder
from selfflow.models.transformer import SelfFlowTransformer
from selfflow.tokenizers.image import ImagePatchTokenizer
from selfflow.training.datamodule import SelfFlowDataModule, check_size_conditioning
from tests.helpers.configs import TINY

# (height, width) of the images written: aspects w/h from 0.4 to 2.5
SHAPES = [(48, 24), (40, 24), (30, 30), (24, 40), (20, 50)]
BUCKETS = {
    "max_aspect": 2.0
}  # with image_size 16 and patch 4: (24, 12), (20, 12), (16, 16), (12, 20), (12, 24)


def write_images(root: Path, per_shape: int = 4, captions: bool = False) -> Path:
    """Solid-colour PNGs of every shape in two classes; colour i/40 of red identifies image i."""
    i = 0
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for h, w in SHAPES:
            for _ in range(per_shape // 2):
                pixels = np.zeros((h, w, 3), np.uint8)
                pixels[..., 0] = 5 * i
                Image.fromarray(pixels).save(root / cls / f"{i:03d}.png")
                if captions:
                    (root / cls / f"{i:03d}.txt").write_text(f"image {i}")
                i += 1
    return root


def bucketed(root: Path, buckets=BUCKETS, **kwargs) -> ImageFolder:
    return ImageFolder(
        str(root),
        "train",
        image_size=16,
        channels=3,
        test_fraction=0.1,
        buckets=buckets,
        bucket_multiple=4,
        **kwargs,
    )


def file_shape(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.height, image.width


def test_every_batch_holds_one_bucket_and_every_sample_its_aspect_and_sizes(tmp_path):
    train = bucketed(write_images(tmp_path / "images"))
    buckets = train.bucketing.buckets
    assert buckets.sizes == [(24, 12), (20, 12), (16, 16), (12, 20), (12, 24)]
    test = ImageFolder(
        str(tmp_path / "images"), "test", image_size=16, test_fraction=0.1, buckets=BUCKETS
    )
    assert test.bucket_ids is None and test[0][0].shape == (
        3,
        16,
        16,
    )  # the test split stays square
    data = SelfFlowDataModule.from_splits(train, train, "image", batch_size=2, seed=3)
    data.setup("fit")
    loader = data.train_dataloader()
    expected = Counter(
        file_shape(train.paths[i]) for batch in data.train_batches.buckets.batches(0) for i in batch
    )
    originals = Counter()
    for batch in loader:
        b, c, h, w = batch["data"].shape
        sizes = batch["sizes"]  # [B, 6]
        assert c == 3 and (h, w) in buckets.sizes and sizes.shape == (b, 6)
        low, high = buckets.aspect_range(buckets.sizes.index((h, w)))
        for row in sizes.tolist():
            orig_h, orig_w, top, left, target_h, target_w = map(int, row)
            assert (
                low <= orig_w / orig_h <= high
            )  # the sample's aspect lies within its bucket's range
            crop = bucket_crop(orig_h, orig_w, (h, w))
            assert (target_h, target_w) == (h, w) and (top, left) == (crop.top, crop.left)
            originals[(orig_h, orig_w)] += 1
    assert originals == expected and sum(expected.values()) == 2 * len(data.train_batches)
    # the sample in its bucket is the right file; a plain index still gives the square image
    i = train.bucket_ids.index(buckets.sizes.index((12, 20)))
    image, _label, extra = train[BucketIndex(i)]
    assert image.shape == (3, 12, 20) and extra["sizes"][:2].tolist() == list(
        file_shape(train.paths[i])
    )
    red = 5 * int(train.paths[i].stem) / 255
    assert (
        torch.allclose(image[0], torch.full((12, 20), red), atol=1 / 255)
        and image[1:].abs().max() == 0
    )
    square = train[i]
    assert len(square) == 2 and square[0].shape == (3, 16, 16)


def test_sizes_are_read_once_from_the_file_headers(tmp_path, monkeypatch):
    calls = []
    original = image_folder.read_image_size
    monkeypatch.setattr(
        image_folder, "read_image_size", lambda path: calls.append(path) or original(path)
    )
    monkeypatch.setattr(
        image_folder, "load_image_in_bucket", lambda *a, **k: pytest.fail("decoded at setup")
    )
    train = bucketed(write_images(tmp_path / "images"))
    data = SelfFlowDataModule.from_splits(train, train, "image", batch_size=2)
    data.setup("fit")
    data.train_dataloader()
    data.train_dataloader()
    assert sorted(calls) == sorted(train.paths)  # once per file, no pixel decoded
    monkeypatch.undo()
    train.paths[0].write_bytes(
        b"not an image"
    )  # an unreadable header: the squarest bucket, skipped when drawn
    broken = bucketed(tmp_path / "images", on_bad_file="skip")
    assert broken.bucket_ids[0] == 2 and broken[BucketIndex(0)] is None


def test_bucket_sampler_resumes_mid_epoch_with_the_same_batches_and_seeds():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4, size=61).tolist()
    full = ResumableBucketBatchSampler(ids, 3, seed=5)
    epoch0, epoch1 = list(full), list(full)  # each iteration is the next epoch
    assert epoch0 != epoch1 and len(epoch0) == len(full) == len(epoch1)
    for b, batch in enumerate(epoch0):
        assert len(batch) == 3 and len({ids[i] for i, _ in batch}) == 1
        assert all(isinstance(i, BucketIndex) and seed == mix_seed(5, 0, b, 0) for i, seed in batch)
    resumed = ResumableBucketBatchSampler(ids, 3, seed=5)
    resumed.set_epoch(0)
    resumed.skip_batches(4)
    assert list(resumed) == epoch0[4:] and list(resumed) == epoch1
    at_end = ResumableBucketBatchSampler(ids, 3, seed=5)
    at_end.skip_batches(len(at_end))  # an end-of-epoch position starts the next epoch
    assert list(at_end) == epoch1
    ranks = [
        list(ResumableBucketBatchSampler(ids, 3, seed=5, num_replicas=2, rank=r)) for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) > 0
    assert not {i for b in ranks[0] for i, _ in b} & {i for b in ranks[1] for i, _ in b}
    few = ResumableBucketBatchSampler(
        [0, 1, 2], 4
    )  # no bucket fills a batch: partial batches are kept
    assert sorted(i for b in few for i, _ in b) == [0, 1, 2]


def test_the_datamodule_resumes_bucketed_data_exactly(tmp_path):
    # random crops and flips: the augmentation must replay too
    train = bucketed(
        write_images(tmp_path / "images", per_shape=6), {**BUCKETS, "random_crop": True}, hflip=True
    )
    data = SelfFlowDataModule.from_splits(train, train, "image", batch_size=2, seed=9)
    whole = [(b["data"], b["sizes"]) for b in data.train_dataloader()]
    again = SelfFlowDataModule.from_splits(train, train, "image", batch_size=2, seed=9)
    again.load_state_dict({"epoch": 0, "batches_done": 3})
    rest = [(b["data"], b["sizes"]) for b in again.train_dataloader()]
    assert len(rest) == len(whole) - 3 > 0
    for (x, sizes), (y, sizes_again) in zip(whole[3:], rest):
        assert torch.equal(x, y) and torch.equal(sizes, sizes_again)


def test_captioned_folder_with_buckets_carries_sizes_and_captions(tmp_path):
    root = write_images(tmp_path / "images", captions=True)
    train = CaptionedImageFolder(
        str(root),
        "train",
        image_size=16,
        channels=3,
        buckets=[[12, 20], [20, 12]],
        bucket_multiple=4,
    )
    wide, tall = (
        train.bucketing.buckets.sizes.index((12, 20)),
        train.bucketing.buckets.sizes.index((20, 12)),
    )
    i = train.bucket_ids.index(wide)
    image, _label, extra, caption = train[BucketIndex(i)]
    assert (
        image.shape == (3, 12, 20)
        and extra["sizes"].shape == (6,)
        and caption["caption"] == f"image {int(train.paths[i].stem)}"
    )
    same_bucket = [BucketIndex(j) for j, b in enumerate(train.bucket_ids) if b == wide][:3]
    batch = collate_samples("image")([train[j] for j in same_bucket])
    assert (
        batch["data"].shape == (3, 3, 12, 20)
        and batch["sizes"].shape == (3, 6)
        and len(batch["caption"]) == 3
    )
    with pytest.raises(ValueError, match="different shapes .* bucket batch sampler"):
        collate_samples("image")(
            [train[BucketIndex(i)], train[BucketIndex(train.bucket_ids.index(tall))]]
        )


def test_bucket_settings_are_checked():
    sizes = make_buckets(64, 4, max_aspect=3.0)
    assert all((w, h) in sizes for h, w in sizes)  # portrait and landscape alike
    assert len({w / h for h, w in sizes}) == len(sizes)  # one size per aspect
    assert parse_buckets([[12, 20], [16, 16]], 4, 16).buckets.sizes == [(16, 16), (12, 20)]
    assert parse_buckets({"sizes": [[8, 8]], "random_crop": True}, 4, 16).random_crop
    for value, message in [
        ([[12, 18]], "not a multiple of the patch size 4"),
        ({"base": 16}, "unknown keys"),
        ([[8, 8], [16, 16]], "same aspect ratio"),
        ("wide", "not a bucket setting"),
        ([[12]], "pair"),
        ({"max_aspect": 0.5}, "max_aspect=0.5 must be >= 1"),
        ({"base_size": 18}, "base_size=18 must be a multiple"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_buckets(value, 4, 16)


def test_size_conditioning_must_match_the_buckets_at_start_up(tmp_path):
    root = write_images(tmp_path / "images")
    square = ImageFolder(str(root), "train", image_size=16)
    tokenizers = {"image": ImagePatchTokenizer(4, 3, 16)}

    def module(conditioned: bool):
        model = SelfFlowTransformer(
            {"image": 48}, width=32, depth=2, heads=2, size_conditioning=conditioned
        )
        return SimpleNamespace(model=model, tokenizers=tokenizers)

    check_size_conditioning(bucketed(root), "image", module(True))
    check_size_conditioning(square, "image", module(False))
    with pytest.raises(
        ValueError, match=r"data.dataset.buckets is set .* model.size_conditioning=true"
    ):
        check_size_conditioning(bucketed(root), "image", module(False))
    with pytest.raises(
        ValueError, match=r"model.size_conditioning=true but .*\(data.dataset.buckets is null\)"
    ):
        check_size_conditioning(square, "image", module(True))
    odd = ImageFolder(str(root), "train", image_size=16, buckets=[[18, 30], [16, 16]])
    with pytest.raises(
        ValueError, match=r"\[\[18, 30\]\] are not multiples of tokenizer.image.patch_size=4"
    ):
        check_size_conditioning(odd, "image", module(True))


def test_the_image_tokenizer_takes_any_whole_patch_size():
    tokenizer = ImagePatchTokenizer(4, 3, 16)
    images = torch.rand(2, 3, 12, 20)
    tokens = tokenizer.encode(images)
    assert tokens.x.shape == (2, 15, 48) and tokens.pos[0, -1].tolist() == [0, 2, 4, 0]
    assert torch.allclose(ImagePatchTokenizer(4, 3, (12, 20)).decode(tokens.x), images, atol=1e-6)
    with pytest.raises(ValueError, match="multiples of patch_size=4"):
        tokenizer.encode(torch.rand(1, 3, 12, 18))


def test_sample_size_must_be_whole_patches_of_a_pixel_checkpoint():
    from selfflow.sampling.modalities import tokenizer_at_length

    tokenizer = ImagePatchTokenizer(4, 1, 16)
    assert tokenizer_at_length(tokenizer, "image", {"size": None}) is tokenizer
    assert tokenizer_at_length(tokenizer, "image", {"size": [12, 20]}).image_size == (12, 20)
    with pytest.raises(
        ValueError,
        match=r"size=\[12, 18\] must be whole patches: .*patch_size=4, e.g. size=\[12,20\]",
    ):
        tokenizer_at_length(tokenizer, "image", {"size": [12, 18]})
    with pytest.raises(ValueError, match=r"must be \[height, width\]"):
        tokenizer_at_length(tokenizer, "image", {"size": [12, 20, 4]})
    with pytest.raises(ValueError, match=r"size= is for image checkpoints; this one samples audio"):
        tokenizer_at_length(tokenizer, "audio", {"size": [12, 20]})


@pytest.fixture(scope="module")
def bucketed_checkpoint(tmp_path_factory) -> Path:
    """A 2-step `selfflow-train` run with buckets and size conditioning; its last checkpoint."""
    tmp = tmp_path_factory.mktemp("buckets")
    images, run_dir = write_images(tmp / "images"), tmp / "run"
    args = [
        *TINY,
        "data=image_folder",
        f"data.root={images}",
        "data.dataset.image_size=16",
        "data.batch_size=2",
        "tokenizer.image.patch_size=4",
        "data.dataset.buckets={max_aspect: 2.0}",
        "model.size_conditioning=true",
        "trainer.max_steps=2",
        "callbacks.probe.every_n_steps=2",
        "callbacks.probe.train_samples=8",
        "callbacks.probe.test_samples=4",
        "callbacks.probe.epochs=2",
        f"hydra.run.dir={run_dir}",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "selfflow.cli.train", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_selfflow_train_with_buckets_writes_a_size_conditioned_checkpoint(bucketed_checkpoint):
    from selfflow.interop.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(bucketed_checkpoint)
    assert checkpoint["global_step"] == 2
    assert any(k.startswith("objective.model.size_embedder.") for k in checkpoint["state_dict"])
    # the size embedder was trained (it starts at zero): the bucketed batches reached the model with
    # their sizes
    last = [
        v
        for k, v in checkpoint["state_dict"].items()
        if k == "objective.model.size_embedder.mlp.2.weight"
    ]
    assert last and last[0].abs().sum() > 0
    with open(
        bucketed_checkpoint.parent.parent / "metrics.csv"
    ) as f:  # the probe batches square images freely
        assert any(row.get("probe/top1") for row in csv.DictReader(f))


@pytest.mark.slow
def test_sampling_at_two_bucket_sizes_gives_images_of_those_sizes(bucketed_checkpoint, tmp_path):
    from hydra import compose, initialize_config_module

    from selfflow.cli.sample import sample

    def run(*overrides):
        with initialize_config_module("selfflow.conf", version_base="1.3"):
            cfg = compose(
                "sample",
                overrides=[
                    "progress=false",
                    f"ckpt={bucketed_checkpoint}",
                    "num_samples=3",
                    "steps=2",
                    "device=cpu",
                    *overrides,
                ],
            )
        return sample(cfg)

    for h, w in [(12, 20), (24, 12)]:
        out = tmp_path / f"{h}x{w}"
        summary = run(f"size=[{h},{w}]", f"out_dir={out}")
        assert summary["size"] == [h, w]
        assert np.load(out / "samples.npz")["arr_0"].shape == (3, h, w, 3)
        with Image.open(sorted((out / "images").glob("*.png"))[0]) as image:
            assert image.size == (w, h)
        assert json.loads((out / "sampling.json").read_text())["size"] == [h, w]
    with pytest.raises(ValueError, match=r"size=\[12, 22\] must be whole patches"):
        run("size=[12,22]", f"out_dir={tmp_path / 'bad'}")
