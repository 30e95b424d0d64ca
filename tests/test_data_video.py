"""Video data on real files: MP4/MKV written here with PyAV, read back through VideoFolder; built-in
moving digits; every bad-input case."""

import csv
import io
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from selfflow.data.batching.collate import collate_samples
from selfflow.data.builtin.moving_digits import DIRECTIONS, MovingDigits
from selfflow.data.folders.video_folder import VideoFolder
from selfflow.io.bad_files import BadFileError
from selfflow.io.video import clip_frames_available, read_clip, write_mp4
from tests.helpers.files import ramp_video, write_video_folder


def grey_levels(clip: torch.Tensor) -> list[int]:
    """clip: [T, 1, H, W] -> the mean grey level of each frame, in 0-255 units."""
    return [round(float(v) * 255) for v in clip.mean(dim=(1, 2, 3))]


def test_video_folder_reads_labelled_clips_centred_in_test(tmp_path):
    write_video_folder(tmp_path / "v")
    test = VideoFolder(
        str(tmp_path / "v"),
        "test",
        num_frames=4,
        frame_stride=2,
        image_size=16,
        channels=1,
        test_fraction=0.34,
    )
    train = VideoFolder(
        str(tmp_path / "v"),
        "train",
        num_frames=4,
        frame_stride=2,
        image_size=16,
        channels=1,
        test_fraction=0.34,
    )
    assert test.class_names == ["walk", "wave"] and test.num_classes == 2
    assert len(train) + len(test) == 6 and set(train.paths).isdisjoint(test.paths)
    clip, label = test[0]
    assert clip.shape == (4, 1, 16, 16) and clip.min() >= 0 and clip.max() <= 1
    # 20 frames, a clip spans 7: the centred start is frame 6, so frames 6, 8, 10, 12 (value 8 t +
    # 40 label)
    expected = [8 * t + 40 * label for t in (6, 8, 10, 12)]
    assert all(abs(a - b) <= 2 for a, b in zip(grey_levels(clip), expected)), (
        grey_levels(clip),
        expected,
    )
    rgb = VideoFolder(
        str(tmp_path / "v"), "test", num_frames=4, image_size=8, channels=3, test_fraction=0.34
    )[0][0]
    assert rgb.shape == (4, 3, 8, 8)


def test_training_clips_start_at_random_frames_with_the_asked_stride(tmp_path):
    write_video_folder(tmp_path / "v", classes=("a",), per_class=2)
    train = VideoFolder(
        str(tmp_path / "v"),
        "train",
        num_frames=3,
        frame_stride=3,
        image_size=8,
        channels=1,
        test_fraction=0.5,
    )
    starts = set()
    for _ in range(20):
        levels = grey_levels(train[0][0])
        frames = [round(v / 8) for v in levels]
        assert frames[1] - frames[0] == frames[2] - frames[1] == 3
        starts.add(frames[0])
    assert len(starts) > 3 and min(starts) >= 0 and max(starts) <= 13


def test_target_fps_resamples_the_frame_rate(tmp_path):
    path = write_mp4(ramp_video(20), tmp_path / "clip.mp4", fps=20, crf=0)
    frames = read_clip(path, num_frames=4, fps=5)  # 20 fps source at 5 fps: every 4th frame
    levels = [round(float(f.mean()) / 8) for f in frames]
    assert np.diff(levels).tolist() == [4, 4, 4]


def test_one_video_library_reads_paths_and_bytes_alike_at_any_frame_width(tmp_path):
    path = write_mp4(ramp_video(12), tmp_path / "clip.mp4", fps=10, crf=0)
    from_path = read_clip(path, 5, 2, backend="auto")
    from_bytes = read_clip(io.BytesIO(path.read_bytes()), 5, 2, backend="pyav")
    np.testing.assert_array_equal(from_path, from_bytes)
    # the centred clip: frames 1..9
    assert [round(float(f.mean()) / 8) for f in from_path] == [1, 3, 5, 7, 9]
    narrow = write_mp4(ramp_video(12, size=16), tmp_path / "narrow.mp4", fps=10, crf=0)
    assert read_clip(narrow, 5, 2).shape == (5, 16, 16, 3)  # widths decord 0.6 refused
    unknown = r"backend='decord' is unknown; choose one of \('auto', 'pyav'\)"
    with pytest.raises(ValueError, match=unknown):
        read_clip(path, 5, 2, backend="decord")


def test_other_containers_and_codecs_are_read(tmp_path):
    path = tmp_path / "a" / "clip.mkv"
    path.parent.mkdir()
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(10))
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for frame in ramp_video(10):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    dataset = VideoFolder(
        str(tmp_path), "test", num_frames=4, image_size=32, channels=1, test_fraction=0.5
    )
    assert dataset[0][0].shape == (4, 1, 32, 32)
    with av.open(str(path)) as container:
        assert (
            container.streams.video[0].frames == 0
        )  # Matroska keeps no frame count: length from the duration
    assert (clip_frames_available(path), clip_frames_available(path, frame_stride=2)) == (10, 5)


def test_labels_from_a_csv_manifest_or_a_file_name_pattern(tmp_path):
    rows = []
    for i in range(6):
        label = "jump" if i % 2 else "sit"
        write_mp4(ramp_video(10), tmp_path / "clips" / f"{label}-{i}_x.mp4", 10)
        rows.append(
            {
                "path": f"clips/{label}-{i}_x.mp4",
                "label": label,
                "split": "test" if i < 2 else "train",
            }
        )
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    train = VideoFolder(str(tmp_path), "train", num_frames=2, image_size=8, manifest="labels.csv")
    test = VideoFolder(str(tmp_path), "test", num_frames=2, image_size=8, manifest="labels.csv")
    assert train.class_names == ["jump", "sit"] and len(train) == 4 and len(test) == 2
    assert [train.class_names[y] for y in train.labels] == [
        p.name.split("-")[0] for p in train.paths
    ]
    named = VideoFolder(
        str(tmp_path / "clips"),
        "train",
        num_frames=2,
        image_size=8,
        test_fraction=0.34,
        name_pattern="{action}-{index}_x",
        label_field="action",
    )
    assert named.class_names == ["jump", "sit"]
    assert [named.class_names[y] for y in named.labels] == [
        p.name.split("-")[0] for p in named.paths
    ]
    with pytest.raises(ValueError, match="label_field='speed' is not a field"):
        VideoFolder(str(tmp_path / "clips"), name_pattern="{action}-{index}_x", label_field="speed")
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("path,label\nnotes.txt,a\n")
    with pytest.raises(ValueError, match="notes.txt, whose type is not supported"):
        VideoFolder(str(tmp_path), manifest="bad.csv")


def write_bad_videos(folder, num_frames=12):
    """One file of every broken kind next to good ones; returns {file name: expected words in
    the reason}."""
    good = write_mp4(ramp_video(num_frames), folder / "good0.mp4", 10)
    write_mp4(ramp_video(num_frames), folder / "good1.mp4", 10)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    (folder / "truncated.mp4").write_bytes(good.read_bytes()[:400])
    write_mp4(ramp_video(3), folder / "short.mp4", 10)
    with av.open(
        str(folder / "no_video.mkv"), "w"
    ) as container:  # a codec/stream the reader cannot use
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return {
        "empty.mp4": "empty",
        "corrupt.mp4": "",
        "truncated.mp4": "",
        "short.mp4": "has 3 frames",
        "no_video.mkv": "",
    }


def test_broken_videos_are_skipped_with_a_reason_and_recorded(tmp_path):
    expected = write_bad_videos(tmp_path / "d" / "train" / "a")
    write_mp4(ramp_video(12), tmp_path / "d" / "test" / "a" / "good.mp4", 10)
    record = tmp_path / "skipped.tsv"
    dataset = VideoFolder(str(tmp_path / "d"), "train", num_frames=8, image_size=16)
    dataset.bad_files.record_path = record
    assert len(dataset) == 7
    items = [dataset[i] for i in range(len(dataset))]
    kept = [p.name for p, item in zip(dataset.paths, items) if item is not None]
    assert sorted(kept) == ["good0.mp4", "good1.mp4"]
    batch = collate_samples("video")(items)
    assert batch["data"].shape == (2, 8, 3, 16, 16)
    lines = dict(line.split("\t") for line in record.read_text().splitlines())
    assert sorted(lines) == sorted(str(tmp_path / "d" / "train" / "a" / name) for name in expected)
    for name, words in expected.items():
        assert words in lines[str(tmp_path / "d" / "train" / "a" / name)]


def test_on_bad_file_error_stops_at_the_first_bad_file(tmp_path):
    write_bad_videos(tmp_path / "d" / "a")
    with pytest.raises(
        BadFileError, match="cannot read .*: "
    ):  # at start-up if the first file is bad
        VideoFolder(
            str(tmp_path / "d"),
            "train",
            num_frames=8,
            image_size=16,
            test_fraction=0.1,
            on_bad_file="error",
            name_pattern="{kind}",
            label_field="kind",
        )
    dataset = VideoFolder(
        str(tmp_path / "d"), "train", num_frames=8, image_size=16, test_fraction=0.1
    )
    dataset.bad_files.on_bad_file = "error"
    short = next(i for i, p in enumerate(dataset.paths) if p.name == "short.mp4")
    with pytest.raises(BadFileError, match="short.mp4: video has 3 frames"):
        dataset[short]


def test_startup_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root=.*nowhere is not a folder"):
        VideoFolder(str(tmp_path / "nowhere"))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "clip.gif").write_bytes(b"GIF89a")
    with pytest.raises(FileNotFoundError, match=r"no files with extensions \['.mp4'.*under .*text"):
        VideoFolder(str(tmp_path / "text"))
    (tmp_path / "broken" / "a").mkdir(parents=True)
    (tmp_path / "broken" / "a" / "x.mp4").write_bytes(b"")
    (tmp_path / "broken" / "a" / "y.mp4").write_bytes(b"junk" * 100)
    (tmp_path / "broken" / "a" / "z.mp4").write_bytes(b"")
    with pytest.raises(
        ValueError, match=r"none of the 2 files .* can be read \(the first, .*broken/a/[xyz].mp4: "
    ):
        VideoFolder(str(tmp_path / "broken"), "train", test_fraction=0.1)


def test_moving_digits_are_real_mp4s_with_digit_and_direction_labels(tmp_path):
    sizes = {"clips_train": 24, "clips_test": 8, "cache_dir": str(tmp_path / "cache")}
    digits = MovingDigits("train", label="digit", **sizes)
    directions = MovingDigits("test", label="direction", **sizes)
    folder = digits.paths[0].parents[1]
    assert folder.parent == tmp_path / "cache" / "moving_digits"
    assert (
        len(list((folder / "train").glob("*.mp4"))) == 24
        and len(list((folder / "test").glob("*.mp4"))) == 8
    )
    assert digits.class_names == [str(d) for d in range(10)]
    assert directions.class_names == sorted(name for name, _ in DIRECTIONS)
    clip, label = digits[0]
    assert clip.shape == (8, 1, 16, 16) and label == int(digits.paths[0].name.split("_")[0])
    assert clip.max() > 0.5 and clip.mean() < 0.5  # a bright digit on a black canvas
    # the digit moves: its centre of mass follows the direction in the file name
    clip, label = directions[0]
    dy, dx = dict(DIRECTIONS)[directions.class_names[label]]
    grid = torch.arange(16.0)
    ys = [(f[0].sum(1) * grid).sum() / f.sum() for f in clip]
    xs = [(f[0].sum(0) * grid).sum() / f.sum() for f in clip]
    assert (
        np.sign(round(float(ys[-1] - ys[0]))) == dy and np.sign(round(float(xs[-1] - xs[0]))) == dx
    )


def test_moving_digits_are_decoded_once_and_served_from_memory(tmp_path, monkeypatch):
    from selfflow.data.builtin import moving_digits

    sizes = {"clips_train": 6, "clips_test": 2, "cache_dir": str(tmp_path / "cache")}
    read_each_time = MovingDigits("train", preload=False, **sizes)
    preloaded = MovingDigits("train", **sizes)
    assert preloaded.clips.shape == (6, 8, 1, 16, 16)
    by_direction = MovingDigits("train", label="direction", **sizes)
    assert by_direction.clips is preloaded.clips  # decoded once per process, whatever the label
    for path in preloaded.paths:
        path.write_bytes(b"")  # the files are no longer read: every clip is in memory
    for i in range(6):
        clip, label = preloaded[i]
        assert torch.equal(clip, preloaded.clips[i]) and label == preloaded.labels[i]
    assert read_each_time[0] is None  # (the same emptied file, read again: skipped)
    monkeypatch.setattr(
        moving_digits, "PRELOAD_BYTES", 5 * 8 * 16 * 16 * 4
    )  # 5 clips' worth: 6 are too many
    other = {**sizes, "cache_dir": str(tmp_path / "other")}  # a cache of its own: encoded anew
    too_many = MovingDigits("train", **other)
    from_file = MovingDigits("train", preload=False, **other)[0][0]
    assert too_many.clips is None and torch.equal(too_many[0][0], from_file)  # read from its file


def test_moving_digits_cache_is_written_once_and_keyed_by_parameters(tmp_path):
    sizes = {"clips_train": 6, "clips_test": 2, "cache_dir": str(tmp_path / "cache")}
    first = MovingDigits("train", **sizes)
    stamp = first.paths[0].stat().st_mtime_ns
    again = MovingDigits("test", **sizes)
    assert again.paths[0].parents[1] == first.paths[0].parents[1]
    assert first.paths[0].stat().st_mtime_ns == stamp
    other = MovingDigits("train", speed=1, **sizes)
    assert other.paths[0].parents[1] != first.paths[0].parents[1]
    assert len(list((tmp_path / "cache" / "moving_digits").iterdir())) == 2
    with pytest.raises(ValueError, match="label='colour' is unknown"):
        MovingDigits(label="colour", **sizes)


def test_frame_count_buckets_read_each_video_at_the_longest_clip_it_holds(tmp_path, tiny_train_cfg):
    from selfflow.data.batching.buckets import BucketIndex
    from selfflow.training.build import build_run

    for c, name in enumerate(("walk", "wave")):
        for i, total in enumerate((6, 10, 17, 20)):
            write_mp4(
                ramp_video(total, 32, offset=40 * c),
                tmp_path / "clips" / name / f"{i}.mp4",
                10,
                crf=0,
            )
    data = VideoFolder(
        str(tmp_path / "clips"),
        "train",
        num_frames=4,
        image_size=8,
        channels=1,
        test_fraction=0.01,
        frame_counts=[8, 4],
    )
    assert data.frame_counts == [4, 8] and len(data) == 7
    assert (
        VideoFolder(
            str(tmp_path / "clips"),
            "test",
            num_frames=4,
            image_size=8,
            channels=1,
            test_fraction=0.01,
            frame_counts=[8, 4],
        ).bucket_ids
        is None
    )  # the test split: num_frames
    for i, path in enumerate(
        data.paths
    ):  # stride 1: 6 frames hold a 4-frame clip, 10 and more an 8-frame one
        expected = 0 if path.stem == "0" else 1
        assert data.bucket_ids[i] == expected, path
        assert data[BucketIndex(i)][0].shape == ((4, 8)[expected], 1, 8, 8)
        assert data[i][0].shape == (4, 1, 8, 8)  # a plain index: num_frames
    strided = VideoFolder(
        str(tmp_path / "clips"),
        "train",
        num_frames=4,
        frame_stride=2,
        image_size=8,
        channels=1,
        test_fraction=0.01,
        frame_counts=[4, 8],
    )
    assert {p.stem: strided.bucket_ids[i] for i, p in enumerate(strided.paths)} == {
        "0": 0,
        "1": 0,
        "2": 1,
        "3": 1,
    }
    with pytest.raises(ValueError, match="must be whole numbers of frames"):
        VideoFolder(
            str(tmp_path / "clips"), "test", num_frames=4, test_fraction=0.99, frame_counts=[2.5]
        )

    overrides = [
        "experiment=video_digits",
        "data=video_folder",
        f"data.root={tmp_path / 'clips'}",
        "data.dataset.channels=1",
        "data.dataset.image_size=16",
        "data.dataset.num_frames=4",
        "data.dataset.frame_stride=1",
        "data.num_workers=0",
        "data.batch_size=2",
        "trainer.max_steps=3",
        "callbacks.samples.every_n_steps=0",
        "~callbacks.probe",
    ]
    run = build_run(tiny_train_cfg(*overrides, "data.dataset.frame_counts=[4,8]"))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 3 and set(run.datamodule.train_set.bucket_ids) == {0, 1}
    bad = build_run(
        tiny_train_cfg(*overrides, "data.dataset.frame_counts=[3]", run_dir=tmp_path / "bad")
    )
    with pytest.raises(
        ValueError,
        match=r"data.dataset.frame_counts=\[3\]: a clip of 3 frames is not a whole "
        r"number of tokenizer.video tubelets of 2 frames",
    ):
        bad.trainer.fit(bad.module, datamodule=bad.datamodule)
