"""Shard indexes: written with the shards (or for existing ones by `selfflow-shards index`), read at
start-up instead of the tar headers, refused when stale, and treated as data from others: bounded,
validated against the shard, and checked member by member against the tar headers they point at."""

import io
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfflow.data.shards import dataset as shards_module
from selfflow.data.shards.dataset import ImageShards
from selfflow.data.shards.index import MAX_INDEX_BYTES, index_location
from selfflow.data.shards.writer import write_shards
from tests.helpers.files import png_bytes, write_images, write_tar
from tests.helpers.runs import exit_status


def noise_png(seed: int, side: int = 64) -> bytes:
    """A PNG of random pixels: ~12 KB that do not compress, so a few dozen make a shard of several
    64 KiB blocks."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def big_shard(folder: Path, samples: int = 30, order: list[int] | None = None) -> Path:
    """One shard of `samples` noise images with labels (members in `order` of the samples, keys
    by sample)."""
    order = list(range(samples)) if order is None else order
    return write_tar(
        folder / "train-000000.tar",
        {
            f"{k:06d}.{ext}": data
            for k in order
            for ext, data in (("png", noise_png(k)), ("cls", str(k % 2).encode()))
        },
    )


def same_dataset(a: ImageShards, b: ImageShards) -> None:
    assert len(a) == len(b) and [a.keys[i] for i in range(len(a))] == [
        b.keys[i] for i in range(len(b))
    ]
    for name in ("data_ext", "data_members", "label_members", "caption_members"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.problems == b.problems and a.class_names == b.class_names


def test_the_writer_indexes_every_shard_and_start_up_reads_the_indexes_not_the_headers(
    tmp_path, monkeypatch, caplog
):
    write_images(tmp_path / "src", per_class=5)
    write_shards(
        tmp_path / "src", tmp_path / "shards", "image", test_fraction=0.3, max_samples_per_shard=3
    )
    tars = sorted((tmp_path / "shards").glob("*.tar"))
    assert len(tars) == 4 and all(index_location(tar).is_file() for tar in tars)
    scanned = ImageShards(str(tmp_path / "shards"), "train", image_size=8)

    def no_scan(path):
        raise AssertionError(f"{path} was scanned although it has an index")

    monkeypatch.setattr(shards_module, "scan_shard", no_scan)
    indexed = ImageShards(str(tmp_path / "shards"), "train", image_size=8)
    same_dataset(indexed, scanned)
    for i in range(len(indexed)):
        assert torch.equal(indexed[i][0], scanned[i][0]) and indexed[i][1] == scanned[i][1]
    monkeypatch.undo()
    for tar in (
        tars
    ):  # the scan is still there for shards without an index, and a slow one suggests indexing
        index_location(tar).unlink()
    monkeypatch.setattr(shards_module, "SLOW_SCAN_SECONDS", 0.0)
    with caplog.at_level(logging.WARNING, logger="selfflow.data"):
        same_dataset(ImageShards(str(tmp_path / "shards"), "train", image_size=8), scanned)
    assert (
        f"`selfflow-shards index {tmp_path / 'shards'}` writes an index beside each shard"
        in caplog.text
    )


def test_selfflow_shards_index_indexes_existing_shards_and_rewrites_only_stale_ones(
    tmp_path, capsys
):
    shard = write_tar(
        tmp_path / "s" / "train-000000.tar",
        {
            "000000.png": png_bytes(10),
            "000000.cls": b"1",
            "000001.png": png_bytes(20),
            "000001.cls": b"0",
            "000002.cls": b"0",
            "000003.png": png_bytes(30),
            "000003.cls": b"1",
        },
    )
    with tarfile.open(
        shard, "a"
    ) as tar:  # a key twice and a link member: the index keeps the scan's verdicts
        for name, data in (("000002.png", png_bytes(40)), ("000004.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("000004.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    other = write_tar(
        tmp_path / "s" / "test-000000.tar", {"000000.png": png_bytes(50), "000000.cls": b"0"}
    )
    scanned = ImageShards(str(tmp_path / "s"), "train", image_size=4)
    assert exit_status(["index", str(tmp_path / "s")]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "shards": 2,
        "fresh": 0,
        "written": {str(other): "missing", str(shard): "missing"},
    }
    indexed = ImageShards(str(tmp_path / "s"), "train", image_size=4)
    same_dataset(indexed, scanned)
    assert sorted(indexed.problems) == [2, 4, 5]  # both groups of 000002, and the link
    assert [indexed[i] is None for i in range(len(indexed))] == [
        False,
        False,
        True,
        False,
        True,
        True,
    ]

    assert exit_status(["index", f"{tmp_path}/s/{{train,test}}-000000.tar"]) == 0
    assert json.loads(capsys.readouterr().out) == {"shards": 2, "fresh": 2, "written": {}}
    write_tar(other, {"000000.png": png_bytes(60), "000000.cls": b"1", "000001.png": png_bytes(70)})
    index_location(shard).write_text("{not json")
    assert exit_status(["index", str(tmp_path / "s")]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == {
        str(other): "stale",
        str(shard): "unreadable",
    }
    assert len(ImageShards(str(tmp_path / "s"), "test", image_size=4)) == 2
    assert exit_status(["index", str(tmp_path / "nowhere")]) == 2
    assert "nowhere is neither a folder of shards nor a shard" in capsys.readouterr().err


def test_a_stale_index_is_refused_at_start_up_and_a_copy_stays_valid(tmp_path):
    shard = big_shard(tmp_path / "s")
    assert exit_status(["index", str(shard)]) == 0
    index = index_location(shard).read_bytes()
    original = shard.read_bytes()
    assert len(original) > 4 * (64 << 10)  # a middle that neither hashed end covers
    copied = tmp_path / "copy"
    copied.mkdir()
    shutil.copy(shard, copied)  # a new modification time: the index does not depend on it
    shutil.copy(index_location(shard), copied)
    os.utime(copied / shard.name, (0, 0))
    assert len(ImageShards(str(copied), "train", image_size=4)) == 30

    def flipped(at: int) -> bytes:
        changed = bytearray(original)
        changed[at] ^= 0xFF
        return bytes(changed)

    cases = {
        "grown": original + bytes(1024),
        "first samples": flipped(2000),
        "last samples": flipped(len(original) - 3000),
        "rewritten": big_shard(tmp_path / "other", order=[1, 0, *range(2, 30)]).read_bytes(),
    }
    assert len(cases["rewritten"]) == len(original)  # the same members in another order: same size
    for _name, content in cases.items():
        shard.write_bytes(content)
        index_location(shard).write_bytes(index)
        with pytest.raises(
            ValueError,
            match=r"the index .*train-000000\.tar\.index\.json describes another version "
            r"of .*train-000000\.tar .*selfflow-shards index FOLDER",
        ):
            ImageShards(str(shard.parent), "train", image_size=4)
    shard.write_bytes(original)
    assert len(ImageShards(str(shard.parent), "train", image_size=4)) == 30


def test_a_change_in_the_middle_is_caught_by_each_members_tar_header(tmp_path):
    shard = big_shard(tmp_path / "s")
    assert exit_status(["index", str(shard)]) == 0
    before = ImageShards(str(shard.parent), "train", image_size=8)
    expected = [before[i] for i in range(30)]
    # samples 14 and 15 swapped: the same size, the same first and last 64 KiB, another layout in
    # the middle
    big_shard(tmp_path / "s", order=[*range(14), 15, 14, *range(16, 30)])
    dataset = ImageShards(
        str(shard.parent), "train", image_size=8
    )  # the fingerprint cannot see the middle
    record = tmp_path / "skipped.tsv"
    dataset.bad_files.record_path = record
    assert (
        dataset[14] is None and dataset[15] is None
    )  # never the other sample's image under this key
    assert (
        "does not match the shard's index: its tar header names '000015.png'" in record.read_text()
    )
    for i in (*range(14), *range(16, 30)):
        assert torch.equal(dataset[i][0], expected[i][0]) and dataset[i][1] == expected[i][1]


def write_index(shard: Path, document: dict, **changes) -> None:
    index_location(shard).write_text(json.dumps({**document, **changes}))


def test_a_hostile_index_is_bounded_and_checked_against_its_shard(tmp_path):
    shard = write_tar(
        tmp_path / "s" / "train-000000.tar",
        {
            "000000.png": png_bytes(10),
            "000000.cls": b"0",
            "000001.png": png_bytes(20),
            "000001.cls": b"1",
        },
    )
    link = tarfile.TarInfo("000002.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with tarfile.open(shard, "a") as tar:
        tar.addfile(link)
    assert exit_status(["index", str(shard)]) == 0
    good = json.loads(index_location(shard).read_text())
    size = shard.stat().st_size
    members = good["members"]
    link_row = members[-4:]
    assert link_row[3] == -1  # the link: not file data
    malformed = {
        "past the end": {"members": [*members[:-4], link_row[0], link_row[1], size - 512, 600]},
        "off the blocks": {"members": [*members[:2], members[2] + 1, *members[3:]]},
        "below -1": {"members": [*members[:3], -2, *members[4:]]},
        "unknown sample": {"members": [*members[:-4], 99, *link_row[1:]]},
        "a float": {"members": [*members[:3], float(members[3]), *members[4:]]},
        "a bool": {"members": [*members[:3], True, *members[4:]]},
        "huge number": {"members": [*members[:3], 10**30, *members[4:]]},
        "not four a row": {"members": members[:-1]},
        "one extension twice": {"members": [*members, *members[:4]]},
        "too many": {"keys": [str(k) for k in range(size // 512 + 1)]},
        "a long key": {"keys": ["k" * 2000, *good["keys"][1:]]},
        "problems": {"problems": [[0, "x" * 5000]]},
    }
    for _case, change in malformed.items():
        write_index(shard, good, **change)
        with pytest.raises(
            ValueError,
            match=r"shard index .*train-000000\.tar\.index\.json is malformed .*"
            r"selfflow-shards index FOLDER",
        ):
            ImageShards(str(shard.parent), "train", image_size=4)
    for text in ("[" * 100_000, "not json", json.dumps({**good, "format": "wids"})):
        index_location(shard).write_text(text)
        with pytest.raises(
            ValueError,
            match=r"train-000000\.tar\.index\.json is not .*selfflow-shards index FOLDER",
        ):
            ImageShards(str(shard.parent), "train", image_size=4)
    with open(
        index_location(shard), "wb"
    ) as f:  # 1 GB claimed on disk (sparse): refused after reading the bound
        f.truncate(1 << 30)
    with pytest.raises(ValueError, match=rf"larger than {MAX_INDEX_BYTES} bytes"):
        ImageShards(str(shard.parent), "train", image_size=4)

    # well-formed but lying: the link member declared as file data (its problem left out), the
    # labels swapped
    with tarfile.open(shard) as tar:
        link_header = tar.getmember("000002.png").offset
    write_index(
        shard,
        good,
        members=[*members[:-4], link_row[0], link_row[1], link_header + 512, 5],
        problems=[],
    )
    dataset = ImageShards(str(shard.parent), "train", image_size=4)
    dataset.bad_files.record_path = tmp_path / "skipped.tsv"
    assert dataset[0] is not None and dataset[2] is None
    assert (
        "000002.png\tits data member does not match the shard's index: its tar "
        "header is not a regular file's" in (tmp_path / "skipped.tsv").read_text()
    )
    label_offsets = {
        row: members[row + 2]
        for row in range(0, len(members), 4)
        if good["extensions"][members[row + 1]] == "cls"
    }  # row of sample 0's label, of sample 1's
    lying = list(members)
    for row, other in zip(label_offsets, reversed(label_offsets.values())):
        lying[row + 2] = other
    write_index(shard, good, members=lying)
    with pytest.raises(
        ValueError,
        match=r"none of the 3 samples .* its \.cls member does not match the shard's "
        r"index: its tar header names '000001\.cls'",
    ):
        ImageShards(str(shard.parent), "train", image_size=4)
