"""WebDataset tar shards: folder -> selfflow-shards write -> shard datasets give the folder
datasets' items, for image, audio and video; shard lists and brace patterns; random access; corrupt
shards and members."""

import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
from hydra.utils import instantiate

from selfflow.cli.shards import parse_bytes
from selfflow.data.batching.collate import collate_samples
from selfflow.data.folders.audio_folder import AudioFolder
from selfflow.data.folders.image_folder import ImageFolder
from selfflow.data.folders.video_folder import VideoFolder
from selfflow.data.shards import writer as shard_writer
from selfflow.data.shards.dataset import (
    AudioShards,
    ImageShards,
    VideoShards,
    expand_braces,
    resolve_shards,
)
from selfflow.data.shards.index import sample_key
from selfflow.data.shards.writer import write_shards
from selfflow.io.bad_files import BadFileError
from tests.helpers.configs import TINY, compose_train
from tests.helpers.files import png_bytes, write_images, write_recordings, write_tar, write_videos
from tests.helpers.runs import exit_status


def same_items(shards, folder, seeded: bool) -> None:
    """Item by item, identical tensors and labels; `seeded`: the same random crop/flip draws
    for both."""
    assert len(shards) == len(folder) > 0
    assert shards.class_names == folder.class_names
    for i in range(len(folder)):
        if seeded:
            torch.manual_seed(i)
        expected_data, expected_label = folder[i]
        if seeded:
            torch.manual_seed(i)
        data, label = shards[i]
        assert label == expected_label
        assert data.shape == expected_data.shape and torch.equal(data, expected_data), (
            f"item {i} differs"
        )


def test_image_shards_round_trip_equals_the_folder_item_by_item(tmp_path):
    write_images(tmp_path / "src", per_class=5)
    summary = write_shards(
        tmp_path / "src", tmp_path / "shards", "image", test_fraction=0.3, max_samples_per_shard=3
    )
    assert summary["splits"]["train"] == {
        "samples": 7,
        "shards": 3,
        "bytes": summary["splits"]["train"]["bytes"],
        "skipped": [],
    }
    assert summary["splits"]["test"]["samples"] == 3
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.tar")) == [
        "test-000000.tar",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    assert (tmp_path / "shards" / "classes.json").is_file()
    info = json.loads((tmp_path / "shards" / "classes.json").read_text())
    assert info["class_names"] == ["cat", "dog"] and info["modality"] == "image"
    for split in ("train", "test"):
        folder = ImageFolder(
            str(tmp_path / "src"), split, image_size=8, hflip=True, test_fraction=0.3
        )
        shards = ImageShards(str(tmp_path / "shards"), split, image_size=8, hflip=True)
        same_items(shards, folder, seeded=True)
    grey = ImageShards(str(tmp_path / "shards"), "test", image_size=6, channels=1)
    assert grey[0][0].shape == (1, 6, 6)


def test_audio_shards_round_trip_equals_the_folder_item_by_item(tmp_path):
    write_recordings(tmp_path / "src")
    write_shards(tmp_path / "src", tmp_path / "shards", "audio", test_fraction=0.34)
    for split in ("train", "test"):  # train crops at random points: seeded the same for both
        folder = AudioFolder(
            str(tmp_path / "src"), split, sample_rate=8000, duration=1.0, test_fraction=0.34
        )
        shards = AudioShards(str(tmp_path / "shards"), split, sample_rate=8000, duration=1.0)
        same_items(shards, folder, seeded=True)
        assert shards[0][0].shape == (1, 8000)


def test_video_shards_round_trip_equals_the_folder_item_by_item(tmp_path):
    write_videos(tmp_path / "src")
    write_shards(tmp_path / "src", tmp_path / "shards", "video", test_fraction=0.25)
    for split, backend in (("train", "auto"), ("test", "auto"), ("test", "pyav")):
        folder = VideoFolder(
            str(tmp_path / "src"),
            split,
            num_frames=4,
            frame_stride=2,
            image_size=16,
            test_fraction=0.25,
            backend=backend,
        )
        shards = VideoShards(
            str(tmp_path / "shards"),
            split,
            num_frames=4,
            frame_stride=2,
            image_size=16,
            backend=backend,
        )
        same_items(shards, folder, seeded=True)
        assert shards[0][0].shape == (4, 3, 16, 16)


def test_brace_patterns_lists_and_the_split_placeholder(tmp_path):
    assert expand_braces("d/train-{000008..000011}.tar") == [
        f"d/train-{n:06d}.tar" for n in range(8, 12)
    ]
    assert expand_braces("{a,b}-{0..1}.tar") == ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
    assert sample_key("dir/000123.seg.PNG") == ("dir/000123", "seg.png")
    with pytest.raises(ValueError, match="unbalanced brace"):
        expand_braces("d/train-{000000..000002.tar")
    with pytest.raises(ValueError, match="runs backwards"):
        expand_braces("d/train-{3..1}.tar")

    write_images(tmp_path / "src", per_class=5)
    out = tmp_path / "shards"
    write_shards(tmp_path / "src", out, "image", test_fraction=0.3, max_samples_per_shard=2)
    by_folder = ImageShards(str(out), "train", image_size=8)
    assert len(by_folder.shards) == 4
    pattern = ImageShards(f"{out}/train-{{000000..000003}}.tar", "train", image_size=8)
    placeholder = ImageShards(f"{out}/{{split}}-{{000000..000003}}.tar", "train", image_size=8)
    listed = ImageShards(
        [str(out / "train-000002.tar"), str(out / "train-000003.tar")], "train", image_size=8
    )
    assert pattern.shards == placeholder.shards == by_folder.shards
    assert len(pattern) == len(by_folder) == 7 and len(listed) == 3
    for i in range(len(listed)):
        assert (
            torch.equal(listed[i][0], by_folder[4 + i][0]) and listed[i][1] == by_folder[4 + i][1]
        )
    with pytest.raises(
        FileNotFoundError, match=r"train-000004\.tar does not exist.*selfflow-shards write"
    ):
        resolve_shards(f"{out}/train-{{000000..000004}}.tar", "train")


def test_length_and_random_access_read_only_the_wanted_member(tmp_path):
    write_images(tmp_path / "src", per_class=6)
    write_shards(
        tmp_path / "src", tmp_path / "shards", "image", test_fraction=0.2, max_shard_bytes=3000
    )
    shards = ImageShards(str(tmp_path / "shards"), "train", image_size=8)
    assert len(shards.shards) > 2  # the byte limit split the set
    in_order = [shards[i] for i in range(len(shards))]
    order = torch.randperm(len(shards), generator=torch.Generator().manual_seed(0)).tolist()
    for i in order:  # any order, any shard: the same items
        assert torch.equal(shards[i][0], in_order[i][0]) and shards[i][1] == in_order[i][1]
    # an item is read at its offset: zeroing every other member (but the end of the archive, read
    # for the index's fingerprint) does not change it; each member's own header is read with it
    path = shards.shards[int(shards.data_members[3, 0])]
    original = path.read_bytes()
    blanked = bytearray(len(original))
    for _, offset, size, _ in (shards.data_members[3], shards.label_members[3]):
        blanked[offset - 512 : offset + size] = original[offset - 512 : offset + size]
    blanked[-1024:] = original[-1024:]
    path.write_bytes(bytes(blanked))
    assert torch.equal(shards[3][0], in_order[3][0]) and shards[3][1] == in_order[3][1]


def test_shards_resume_mid_epoch_with_the_same_batches(tmp_path):
    from selfflow.training.datamodule import SelfFlowDataModule

    write_images(tmp_path / "src", per_class=6)
    write_shards(
        tmp_path / "src", tmp_path / "shards", "image", test_fraction=0.2, max_samples_per_shard=3
    )

    def datamodule():
        train = ImageShards(
            str(tmp_path / "shards"), "train", image_size=8, hflip=True
        )  # random flips too
        test = ImageShards(str(tmp_path / "shards"), "test", image_size=8)
        return SelfFlowDataModule.from_splits(train, test, "image", batch_size=2, seed=3)

    uninterrupted = [batch["data"] for batch in datamodule().train_dataloader()]
    resumed = datamodule()
    resumed.load_state_dict({"epoch": 0, "batches_done": 2})
    continued = [batch["data"] for batch in resumed.train_dataloader()]
    assert len(uninterrupted) == 5 and len(continued) == 3
    assert all(torch.equal(a, b) for a, b in zip(continued, uninterrupted[2:]))


def test_truncated_or_corrupt_shard_stops_at_start_up_naming_it(tmp_path):
    good = write_tar(
        tmp_path / "good" / "train-000000.tar",
        {
            f"{k:06d}.{ext}": data
            for k in range(3)
            for ext, data in (("png", png_bytes(9 * k)), ("cls", b"0"))
        },
    )
    data = good.read_bytes()
    member_end = 512 + 512 + 512 + 512  # after the first sample's png (<=512 bytes) and cls members
    cases = {
        "inside-data": data[:700],
        "at-a-member-boundary": data[:member_end],
        "garbage": b"this is not a tar archive" * 40,
        "empty": b"",
    }
    for name, content in cases.items():
        bad = tmp_path / name / "train-000000.tar"
        bad.parent.mkdir()
        bad.write_bytes(content)
        with pytest.raises(
            ValueError, match=rf"shard .*{name}/train-000000\.tar is truncated or corrupt"
        ):
            ImageShards(str(bad.parent), "train", image_size=8)
    corrupt_header = bytearray(data)
    corrupt_header[member_end : member_end + 100] = b"\xff" * 100  # the second sample's header
    (tmp_path / "header").mkdir()
    (tmp_path / "header" / "train-000000.tar").write_bytes(bytes(corrupt_header))
    with pytest.raises(ValueError, match="header/train-000000.tar is truncated or corrupt"):
        ImageShards(str(tmp_path / "header"), "train", image_size=8)
    assert len(ImageShards(str(good.parent), "train", image_size=8)) == 3


def test_corrupt_member_is_skipped_and_listed_or_fatal_by_policy(tmp_path):
    shard = write_tar(
        tmp_path / "s" / "train-000000.tar",
        {
            "000000.png": png_bytes(10),
            "000000.cls": b"1",
            "000001.png": b"not a png at all",
            "000001.cls": b"0",
            "000002.png": png_bytes(30),
            "000002.cls": b"zero",
            "000003.png": png_bytes(40),
            "000003.cls": b"7",
        },
    )
    (tmp_path / "s" / "classes.json").write_text(
        json.dumps({"class_names": ["a", "b"], "modality": "image"})
    )
    record = tmp_path / "skipped.tsv"
    dataset = ImageShards(str(tmp_path / "s"), "train", image_size=4)
    dataset.bad_files.record_path = record
    assert dataset.num_classes == 2 and len(dataset) == 4
    assert dataset[0][1] == 1 and torch.allclose(dataset[0][0], torch.full((3, 4, 4), 10 / 255))
    assert dataset[1] is None and dataset[2] is None and dataset[3] is None
    batch = collate_samples("image")([dataset[i] for i in range(4)])
    assert batch["data"].shape[0] == 1
    lines = record.read_text().splitlines()
    assert lines[0].startswith(f"{shard}/000001.png\tUnidentifiedImageError")
    assert "'zero', not a class index" in lines[1] and "class index 7 is out of range" in lines[2]
    strict = ImageShards(str(tmp_path / "s"), "train", image_size=4, on_bad_file="error")
    with pytest.raises(BadFileError, match=r"train-000000\.tar/000001\.png.*on_bad_file=skip"):
        strict[1]


def test_clear_errors_for_missing_shards_missing_data_and_the_wrong_modality(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"shard .*nowhere does not exist.*selfflow-shards write"
    ):
        ImageShards(str(tmp_path / "nowhere"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"no train-\*\.tar shards in .*empty; write shards"
    ):
        ImageShards(str(tmp_path / "empty"), "train")
    write_tar(tmp_path / "other" / "part-0.tar", {"000000.png": png_bytes(1)})
    with pytest.raises(FileNotFoundError, match=r"none named test-\*\.tar"):
        ImageShards(str(tmp_path / "other"), "test")
    write_tar(
        tmp_path / "nodata" / "train-000000.tar",
        {"000000.png": png_bytes(1), "000001.cls": b"0", "000001.txt": b"caption only"},
    )
    with pytest.raises(
        ValueError,
        match=r"sample 000001 of shard .*train-000000\.tar has no image member "
        r"\(it holds \['cls', 'txt'\]",
    ):
        ImageShards(str(tmp_path / "nodata"), "train")
    write_recordings(tmp_path / "rec")
    write_shards(tmp_path / "rec", tmp_path / "audio", "audio", test_fraction=0.34)
    with pytest.raises(ValueError, match="hold audio samples, not image; use data=audio_shards"):
        ImageShards(str(tmp_path / "audio"), "train")
    val = write_tar(tmp_path / "valsplit" / "val-000000.tar", {"000000.png": png_bytes(1)})
    assert ImageShards(str(val.parent), "test", image_size=4).shards == [
        val
    ]  # no test-*.tar: val-*.tar


def test_writer_is_atomic_refuses_to_overwrite_and_replaces_stale_shards(tmp_path, capsys):
    write_images(tmp_path / "src", per_class=4)
    (tmp_path / "src" / "cat" / "0.txt").write_text("a small cat\n")
    out = tmp_path / "shards"
    argv = [
        "write",
        str(tmp_path / "src"),
        str(out),
        "--modality",
        "image",
        "--test-fraction",
        "0.25",
        "--max-samples-per-shard",
        "1",
        "--no-progress",
    ]
    assert exit_status(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["train"]["shards"] == 6 and summary["classes"] == 2
    assert exit_status(argv) == 2
    error = capsys.readouterr().err
    assert "already holds shards (test-000000.tar, ... 8 files); pass --overwrite" in error
    assert (
        exit_status([*argv[:-3], "--max-samples-per-shard", "100", "--no-progress", "--overwrite"])
        == 0
    )
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == [
        "classes.json",
        "test-000000.tar",
        "test-000000.tar.index.json",
        "train-000000.tar",
        "train-000000.tar.index.json",
    ]
    shards = ImageShards(str(out), "train", image_size=8)
    captions = [shards.caption(i) for i in range(len(shards))]
    assert captions.count("a small cat") == 1 and captions.count(None) == len(shards) - 1
    assert exit_status(["write", str(tmp_path / "missing"), str(out), "--modality", "image"]) == 2
    assert "data.root=" in capsys.readouterr().err
    assert parse_bytes("1.5G") == int(1.5 * (1 << 30)) and parse_bytes("500M") == 500 << 20


def test_writer_leaves_no_partial_shard_when_interrupted(tmp_path, monkeypatch):
    write_images(tmp_path / "src", per_class=4)
    calls = []

    def failing_add(self, key, members, add=shard_writer.ShardWriter.add):
        calls.append(key)
        if len(calls) == 4:
            raise KeyboardInterrupt
        add(self, key, members)

    monkeypatch.setattr(shard_writer.ShardWriter, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        write_shards(
            tmp_path / "src", tmp_path / "out", "image", test_fraction=0.25, max_samples_per_shard=2
        )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "train-000000.tar",
        "train-000000.tar.index.json",
    ]
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        assert len(tar.getnames()) == 4


@pytest.mark.parametrize(
    "name, tokenizer",
    [
        ("image_shards", "image_pixels"),
        ("audio_shards", "audio_mel"),
        ("video_shards", "video_tubelets"),
    ],
)
def test_shard_data_configs_build_and_batch(name, tokenizer, tmp_path):
    modality = name.split("_")[0]
    {"image": write_images, "audio": write_recordings, "video": write_videos}[modality](
        tmp_path / "src"
    )
    write_shards(tmp_path / "src", tmp_path / "shards", modality, test_fraction=0.34)
    sizes = {
        "image": ["data.dataset.image_size=8"],
        "audio": [],
        "video": ["data.dataset.num_frames=4", "data.dataset.image_size=16"],
    }[modality]
    cfg = compose_train(
        [
            f"data={name}",
            f"tokenizer={tokenizer}",
            f"data.root={tmp_path / 'shards'}",
            "data.batch_size=2",
            *sizes,
        ],
        tmp_path / "run",
    )
    datamodule = instantiate(cfg.data)
    assert datamodule.num_classes == 2 and datamodule.modality == modality
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["data"].shape[0] == 2 and batch["label"].tolist()[0] in (0, 1)
    pattern = compose_train(
        [
            f"data={name}",
            f"tokenizer={tokenizer}",
            *sizes,
            f"data.root='{tmp_path / 'shards'}/{{split}}-{{000000..000000}}.tar'",
        ],
        tmp_path / "r2",
    )
    assert len(instantiate(pattern.data.dataset)(split="test")) == len(datamodule.test_set)


@pytest.mark.slow
def test_train_cli_on_image_shards_writes_a_checkpoint(tmp_path):
    write_images(tmp_path / "src", per_class=6)
    write_shards(tmp_path / "src", tmp_path / "shards", "image", max_samples_per_shard=4)
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "selfflow.cli.train",
            *TINY,
            "data=image_shards",
            f"data.root={tmp_path / 'shards'}",
            "data.batch_size=4",
            "data.dataset.image_size=8",
            "tokenizer.image.patch_size=2",
            "trainer.max_steps=2",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
