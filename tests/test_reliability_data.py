"""Hostile image files mixed into a real folder: each is decoded correctly or skipped and reported,
never a crash, a hang or a memory blow-up."""

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from selfflow.data.batching.collate import collate_samples
from selfflow.data.folders.image_folder import ImageFolder, load_image
from tests.helpers.configs import shared_dataset


def png_header_only(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb if anything
    believed it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def hostile_folder(root: Path) -> dict[str, str]:
    """Good images plus one of each hostile kind; returns {file name: expected outcome ('ok' or a
    reason part)}."""
    good = root / "good"
    good.mkdir(parents=True)
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(good / "plain.png")
    Image.fromarray(rgb).save(root / "good" / "photo.jpg", quality=90)
    odd = root / "odd"
    odd.mkdir()
    expected = {"plain.png": "ok", "photo.jpg": "ok"}
    # decoded correctly
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(odd / "palette.png")
    expected["palette.png"] = "ok"
    grey16 = np.full((16, 16), 40000, dtype=np.uint16)
    Image.fromarray(grey16).save(odd / "grey16.png")
    expected["grey16.png"] = "ok"
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)  # fully transparent
    Image.fromarray(rgba, "RGBA").save(odd / "alpha.png")
    expected["alpha.png"] = "ok"
    Image.fromarray(rgb).convert("CMYK").save(odd / "cmyk.jpg")
    expected["cmyk.jpg"] = "ok"
    Image.fromarray(rgb).save(odd / "really_a_png.jpg", format="PNG")
    expected["really_a_png.jpg"] = "ok"
    Image.fromarray(rgb).convert("1").save(odd / "bilevel.bmp")
    expected["bilevel.bmp"] = "ok"
    Image.fromarray(rgb[:1].repeat(1, 0)).save(odd / "one_row.png")
    expected["one_row.png"] = "ok"
    non_utf8 = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name, not valid UTF-8
    Image.fromarray(rgb).save(odd / non_utf8)
    expected[non_utf8] = "ok"
    # skipped and reported
    full = (good / "plain.png").read_bytes()
    (odd / "truncated.png").write_bytes(full[: len(full) // 2])
    expected["truncated.png"] = "truncated"
    jpeg = (good / "photo.jpg").read_bytes()
    (odd / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    expected["truncated.jpg"] = "truncated"
    (odd / "empty.png").write_bytes(b"")
    expected["empty.png"] = "empty file"
    (odd / "notes.png").write_text("this is text")
    expected["notes.png"] = "cannot identify"
    png_header_only(odd / "bomb.png", 100_000, 100_000)
    expected["bomb.png"] = "ecompression"
    png_header_only(odd / "big.png", 9_000, 9_000)
    expected["big.png"] = "max_pixels"
    os.symlink(odd / "loop_b.png", odd / "loop_a.png")
    os.symlink(odd / "loop_a.png", odd / "loop_b.png")
    expected["loop_a.png"] = expected["loop_b.png"] = "symbolic links"
    os.symlink(odd / "missing.png", odd / "dangling.png")
    expected["dangling.png"] = "No such file"
    os.mkfifo(odd / "pipe.png")
    expected["pipe.png"] = "not a regular file"  # opening it would block forever
    (odd / "folder.png").mkdir()  # a folder with an image's name: not a file, not listed
    os.symlink(odd, odd / "cycle")  # a directory symlink loop: never followed
    return expected


def test_every_hostile_image_kind_is_decoded_or_skipped_and_reported(tmp_path):
    expected = hostile_folder(tmp_path / "images")
    record = tmp_path / "skipped.tsv"
    dataset = ImageFolder(str(tmp_path / "images"), "train", image_size=8, test_fraction=0.01)
    dataset.paths += ImageFolder(
        str(tmp_path / "images"), "test", image_size=8, test_fraction=0.01
    ).paths
    dataset.labels += [0]
    dataset.bad_files.record_path = record
    names = [p.name for p in dataset.paths]
    assert sorted(names) == sorted(
        expected
    )  # every file is seen once (the symlinked folder loop is not walked)
    for index, name in enumerate(names):
        item = dataset[index]
        if expected[name] == "ok":
            assert item is not None, name
            image, _label = item
            assert image.shape == (3, 8, 8) and image.dtype == torch.float32, name
            assert image.min() >= 0 and image.max() <= 1 and torch.isfinite(image).all(), name
        else:
            assert item is None, name
    lines = record.read_text(encoding="utf-8").splitlines()
    reasons = dict(line.split("\t", 1) for line in lines)
    for name, outcome in expected.items():
        if outcome != "ok":
            [reason] = [r for p, r in reasons.items() if p.endswith("/" + name)]
            assert outcome.lower() in reason.lower(), (name, reason)
    assert len(lines) == sum(v != "ok" for v in expected.values())
    batch = collate_samples("image")([dataset[i] for i in range(len(dataset))])
    assert batch["data"].shape == (sum(v == "ok" for v in expected.values()), 3, 8, 8)


def test_odd_modes_decode_to_the_right_values(tmp_path):
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "white16.png")
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(tmp_path / "mid16.png")
    Image.fromarray(np.zeros((8, 8, 4), dtype=np.uint8), "RGBA").save(tmp_path / "clear.png")
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "white_cmyk.jpg", quality=100)
    assert torch.allclose(load_image(tmp_path / "white16.png", 4, 1), torch.ones(1, 4, 4))
    assert torch.allclose(
        load_image(tmp_path / "mid16.png", 4, 1), torch.full((1, 4, 4), 128 / 255), atol=1e-6
    )
    assert torch.allclose(
        load_image(tmp_path / "clear.png", 4, 3), torch.ones(3, 4, 4)
    )  # transparent -> white
    assert load_image(tmp_path / "white_cmyk.jpg", 4, 3).min() > 0.95


def test_an_extreme_aspect_ratio_is_cropped_before_resizing(tmp_path):
    Image.new("L", (20_000, 1), 200).save(
        tmp_path / "line.png"
    )  # resizing the short side first would need 2e10 px
    image = load_image(tmp_path / "line.png", 32, 1)
    assert image.shape == (1, 32, 32) and torch.allclose(
        image, torch.full_like(image, 200 / 255), atol=1 / 255
    )


def test_hostile_files_mixed_into_real_photos_train_without_a_crash(tmp_path, tiny_train_cfg):
    from selfflow.training.build import build_run

    cifar = shared_dataset("cifar10-small")
    root = tmp_path / "mixed"
    for class_dir in sorted((cifar / "train").iterdir())[:2]:
        (root / class_dir.name).mkdir(parents=True)
        for path in sorted(class_dir.iterdir())[:12]:
            (root / class_dir.name / path.name).symlink_to(path)
    hostile_folder(root / "zz_hostile")
    run = build_run(
        tiny_train_cfg(
            "data=image_folder",
            f"data.root={root}",
            "data.dataset.image_size=8",
            "tokenizer.image.patch_size=4",
            "trainer.max_steps=6",
            "data.num_workers=2",
            "callbacks.samples.every_n_steps=0",
        )
    )
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 6
    skipped = (Path(run.run_dir) / "skipped_files.tsv").read_text(encoding="utf-8")
    assert "bomb.png" in skipped or "pipe.png" in skipped  # reported from the worker processes too
    assert all(torch.isfinite(p).all() for p in run.module.parameters())
