"""The latent cache (selfflow-cache, data=latent_cache): both flips' posteriors stored, drawn per
step like on-the-fly encoding, exact resume, and a cache of other settings or with a damaged index
never read."""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

from selfflow.cli.errors import root_cause
from selfflow.data.batching.rng_state import seeded_rng
from selfflow.data.folders.image_folder import ImageFolder
from selfflow.data.shards.latent_cache import LatentCache
from selfflow.tokenizers.image_latent import ImageLatentTokenizer
from tests.helpers.files import write_tiny_vae


def cache_overrides(images, vae, out, *extra):
    return [
        "experiment=imagenet256",
        f"data.root={images}",
        "data.dataset.image_size=32",
        f"tokenizer.image.vae={vae}",
        f"out_dir={out}",
        "accelerator=cpu",
        "data.num_workers=0",
        "batch_size=5",
        "records_per_shard=7",
        "progress=false",
        *extra,
    ]


def build_cache(*overrides):
    from hydra import compose, initialize_config_module

    from selfflow.training.encode_latents import build_latent_cache

    with initialize_config_module("selfflow.conf", version_base="1.3"):
        return build_latent_cache(compose("cache", overrides=list(overrides)))


@pytest.fixture(scope="module")
def cache(tiny_vae, cifar_classes, tmp_path_factory):
    return build_cache(
        *cache_overrides(cifar_classes, tiny_vae, tmp_path_factory.mktemp("latents") / "cache")
    )


def open_cache(cache, vae, split="train", **options):
    return LatentCache(cache, split, vae=str(vae), image_size=32, crop="adm", **options)


def test_the_cache_holds_the_posteriors_of_both_flips_in_sample_order(
    cache, tiny_vae, cifar_classes
):
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["splits"] == {"train": 24, "test": 9} and manifest["crop"] == "adm"
    assert manifest["class_names"] == ["airplane", "cat", "ship"] and manifest["latent_size"] == [
        4,
        4,
    ]
    index = json.loads((cache / "index-train.json").read_text())
    images = ImageFolder(str(cifar_classes), "train", image_size=32, crop="adm")
    assert index["key"] == [str(p) for p in images.paths] and index["label"] == images.labels
    assert len(index["shards"]) == 4  # 24 records, 7 a shard
    with tarfile.open(
        cache / index["shards"][1]
    ) as tar:  # plain tar files; the index points at the members' data
        members = tar.getmembers()
        assert [m.offset_data for m in members] == index["offset"][7:14] and members[
            0
        ].name == "000000007.latent"
    tokenizer = ImageLatentTokenizer(tiny_vae, image_size=32).eval()
    stored = open_cache(cache, tiny_vae)
    for i in (0, 13, 23):
        image = images[i][0]
        mean, std = tokenizer.posterior(torch.stack([image, image.flip(-1)]))
        torch.testing.assert_close(
            stored.moments(i), torch.stack([mean, std], 1), atol=2e-3, rtol=2e-3
        )  # float16


def test_cached_latents_give_the_tokens_of_on_the_fly_encoding_in_distribution(
    cache, tiny_vae, cifar_classes
):
    """Per step: a random flip of the image and a posterior sample, from the cache as from
    the images."""
    draws = 400
    tokenizer = ImageLatentTokenizer(tiny_vae, image_size=32)  # training mode: posterior samples
    stored = open_cache(cache, tiny_vae)
    images = ImageFolder(str(cifar_classes), "train", image_size=32, crop="adm", hflip=True)
    latents, pictures = [], []
    for seed in range(draws):
        with seeded_rng(seed):
            latents.append(stored[5][0])
            pictures.append(images[5][0])
    cached = tokenizer.encode(torch.stack(latents)).x  # [draws, N, C]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        on_the_fly = tokenizer.encode(torch.stack(pictures)).x
    spread = on_the_fly.std(0)
    assert ((cached.mean(0) - on_the_fly.mean(0)).abs() < 0.25 * spread).float().mean() > 0.95
    assert ((cached.std(0) / spread - 1).abs() < 0.2).float().mean() > 0.95
    # both flips are drawn, about half the time each
    flips = (
        stored.moments(5)[:, 0].flatten(1) * tokenizer.scale
    )  # [2, C h w] the two posterior means
    z = torch.stack(latents).flatten(1) * tokenizer.scale
    nearer_mirrored = (torch.cdist(z, flips).argmin(1) == 1).float().mean()
    assert 0.4 < nearer_mirrored < 0.6
    test = open_cache(
        cache, tiny_vae, "test", random_flip=True, sample_posterior=True
    )  # the options of the run
    with seeded_rng(0):
        first = test[5][0]
    with seeded_rng(
        1
    ):  # the test split reads the posterior mean of the image as it is, whatever the seed
        torch.testing.assert_close(test[5][0], first)
    torch.testing.assert_close(first, test.moments(5)[0, 0])


def latent_run_args(cache, vae):
    return [
        "experiment=imagenet256",
        "data=latent_cache",
        f"data.root={cache}",
        "data.dataset.image_size=32",
        f"tokenizer.image.vae={vae}",
        "model.width=32",
        "model.depth=2",
        "model.heads=2",
        "global_batch_size=8",
        "data.num_workers=0",
        "callbacks.samples.every_n_steps=0",
    ]


@pytest.mark.slow
def test_resuming_a_run_on_the_cache_repeats_the_losses(cache, tiny_vae, tiny_train_cfg, tmp_path):
    from selfflow.interop.checkpoint import load_checkpoint
    from selfflow.training.run import train
    from tests.helpers.runs import losses

    args = [
        *latent_run_args(cache, tiny_vae),
        "trainer.max_steps=5",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.checkpoint.save_top_k=-1",
    ]
    first = train(tiny_train_cfg(*args, run_dir=tmp_path / "a"))
    assert isinstance(first.datamodule.train_set, LatentCache) and first.datamodule.batch_size == 8
    (tmp_path / "b" / "checkpoints").mkdir(
        parents=True
    )  # step 2: the middle of the first epoch (3 batches)
    shutil.copy(
        tmp_path / "a" / "checkpoints" / "step_0000002.ckpt", tmp_path / "b" / "checkpoints"
    )
    train(tiny_train_cfg(*args, "resume=auto", run_dir=tmp_path / "b"))
    expected = losses(tmp_path / "a")
    assert sorted(expected) == list(range(5))
    assert losses(tmp_path / "b") == {k: v for k, v in expected.items() if k >= 2}
    moved = shutil.copytree(
        tiny_vae, tmp_path / "moved-vae"
    )  # selfflow-probe vae=...: the cache data follows
    loaded = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt", vae=str(moved))
    assert loaded.config.data.dataset.vae == str(moved)


def test_a_cache_of_another_vae_crop_or_size_is_refused_naming_the_difference(
    cache, tiny_vae, tiny_train_cfg, tmp_path
):
    from selfflow.training.build import build_run

    other = write_tiny_vae(tmp_path / "other-vae", seed=3)
    with pytest.raises(Exception) as caught:
        build_run(tiny_train_cfg(*latent_run_args(cache, other)))
    assert re.search(
        r"made with another VAE .* than tokenizer.image.vae=.*other-vae",
        str(root_cause(caught.value)),
    )
    with pytest.raises(
        ValueError, match="made with crop=adm, but this run asks for data.dataset.crop=center"
    ):
        LatentCache(cache, vae=str(tiny_vae), image_size=32, crop="center")
    with pytest.raises(
        ValueError,
        match="made with image_size=32, but this run asks for data.dataset.image_size=64",
    ):
        LatentCache(cache, vae=str(tiny_vae), image_size=64, crop="adm")
    with pytest.raises(FileNotFoundError, match="must be a folder written by selfflow-cache"):
        LatentCache(tmp_path, vae=str(tiny_vae), image_size=32)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m, i: i.update(offset=[10**12] * len(i["offset"])), "points outside its shards"),
        (lambda m, i: i["shards"].__setitem__(0, "../outside.tar"), "which is not a .tar file in"),
        (lambda m, i: i.update(label=[7] * len(i["label"])), "labels outside the 3 classes"),
        (lambda m, i: m.update(latent_channels=10**9), "latent_channels is 1000000000, outside"),
        (lambda m, i: m.update(latent_channels=2.5), "latent_channels is 2.5, not a whole number"),
        # in bounds, but not what the run's VAE makes: compared with the VAE before any record is
        # sized
        (lambda m, i: m.update(latent_size=[4096, 4096]), "makes 4 x \\[4, 4\\]"),
        (lambda m, i: m.update(latent_channels=8), "declares latents of 8 channels"),
        # every record pointing at the same bytes: a batch of them is no longer bounded by the
        # shards' size
        (lambda m, i: i.update(offset=[i["offset"][0]] * len(i["offset"])), "overlap"),
    ],
)
def test_a_damaged_or_hostile_index_is_refused_before_anything_is_read(
    cache, tiny_vae, tmp_path, damage, message
):
    copy = shutil.copytree(cache, tmp_path / "copy")
    shutil.copy(
        cache / "train-r000-000000.tar", tmp_path / "outside.tar"
    )  # a real shard, outside the cache folder
    manifest, index = (
        json.loads((copy / name).read_text()) for name in ("manifest.json", "index-train.json")
    )
    damage(manifest, index)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "index-train.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=message):
        open_cache(copy, tiny_vae)


def test_a_cache_shard_that_links_to_a_file_outside_the_cache_folder_is_refused(
    cache,
    tiny_vae,
    tmp_path,
):
    from selfflow.io.safe_files import UnsafeFileError

    copy = shutil.copytree(cache, tmp_path / "copy")
    # the same size: the index's offsets fit
    outside = shutil.copy(cache / "train-r000-000001.tar", tmp_path / "outside.tar")
    (copy / "train-r000-000001.tar").unlink()
    (copy / "train-r000-000001.tar").symlink_to(outside)
    linked = r"train-r000-000001\.tar resolves to .*outside\.tar, outside"
    with pytest.raises(UnsafeFileError, match=linked) as refused:
        open_cache(copy, tiny_vae)
    assert "\n" not in str(refused.value)


def test_selfflow_cache_keeps_a_finished_cache_and_never_writes_into_another_folder(
    cache, tiny_vae, cifar_classes, tmp_path, capsys
):
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert build_cache(*cache_overrides(cifar_classes, tiny_vae, cache)) == cache
    assert "already holds this cache" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before
    with pytest.raises(ValueError, match="holds a latent cache of other settings"):
        build_cache(*cache_overrides(cifar_classes, tiny_vae, cache, "data.dataset.crop=center"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        build_cache(*cache_overrides(cifar_classes, tiny_vae, tmp_path / "busy"))
    pixels = [
        o for o in cache_overrides(cifar_classes, tiny_vae, tmp_path / "new") if "vae=" not in o
    ]
    with pytest.raises(ValueError, match="choose tokenizer=image_sdvae"):
        build_cache(*pixels, "tokenizer=image_pixels")
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_two_processes_write_the_cache_one_process_writes(cache, tiny_vae, cifar_classes, tmp_path):
    out = tmp_path / "two"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "selfflow.cli.cache",
            *cache_overrides(cifar_classes, tiny_vae, out, "devices=2"),
        ],
        cwd=tmp_path,
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2 processes)" in result.stdout
    for split in ("train", "test"):
        one, two = (json.loads((c / f"index-{split}.json").read_text()) for c in (cache, out))
        assert two["key"] == one["key"] and two["label"] == one["label"]
        assert {name.split("-")[1] for name in two["shards"]} == {"r000", "r001"}
        a, b = open_cache(cache, tiny_vae, split), open_cache(out, tiny_vae, split)
        for i in range(len(a)):
            torch.testing.assert_close(b.moments(i), a.moments(i), atol=2e-3, rtol=2e-3)


def test_a_cache_from_tar_shards_holds_the_records_of_the_cache_from_the_folder(
    cache, tiny_vae, cifar_classes, tmp_path
):
    from selfflow.cli.shards import main as shards_main

    assert (
        shards_main(["write", str(cifar_classes), str(tmp_path / "shards"), "--modality", "image"])
        == 0
    )
    from_shards = build_cache(
        *cache_overrides(tmp_path / "shards", tiny_vae, tmp_path / "cache"), "data=image_shards"
    )
    for split in ("train", "test"):
        a, b = open_cache(cache, tiny_vae, split), open_cache(from_shards, tiny_vae, split)
        assert b.labels.tolist() == a.labels.tolist()
        for i in range(len(a)):
            torch.testing.assert_close(b.moments(i), a.moments(i), atol=2e-3, rtol=2e-3)
