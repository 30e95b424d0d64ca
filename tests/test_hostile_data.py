"""Files from others are data: selfflow-shards write ships only what the source folder holds and
what decodes, and tiny hostile shards, recordings and videos are refused (naming the file and the
limit) at a small memory cost.

Memory bounds are checked in a fresh Python whose address space may grow only a few hundred MB past
what it holds once the decoders are imported (`run_bounded`): a loader that allocates what a file
claims dies there."""

import csv
import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from selfflow.data.folders.image_folder import ImageFolder
from selfflow.data.shards.dataset import ImageShards
from selfflow.data.shards.writer import write_shards
from selfflow.io.audio import READ_BLOCK_VALUES, read_audio, resampling_rates
from selfflow.io.bad_files import BadFilePolicy
from tests.helpers.configs import compose_train
from tests.helpers.files import png_bytes, write_images, write_tar
from tests.helpers.hostile import lines_of, run_bounded
from tests.helpers.runs import exit_status

REPO = Path(__file__).resolve().parents[1]


# --- selfflow-shards write ------------------------------------------------------------------------


def shard_bytes(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(folder.glob("*.tar")))


def test_write_shards_never_copies_a_file_from_outside_the_source_folder(tmp_path):
    secret = Image.fromarray(np.full((8, 8, 3), 77, dtype=np.uint8))
    secret.save(tmp_path / "secret.png")
    (tmp_path / "secret.txt").write_text("the password is swordfish")
    outside = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    source = tmp_path / "src"
    write_images(source / "train", per_class=3)
    (source / "train" / "cat" / "leak.png").symlink_to(tmp_path / "secret.png")
    (source / "train" / "dog" / "0.txt").symlink_to(
        tmp_path / "secret.txt"
    )  # the caption of dog/0.jpg
    summary = write_shards(source, tmp_path / "shards", "image", splits=("train",))
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["splits"]["train"]["skipped"]}
    assert set(reasons) == {"leak.png", "0.jpg"}
    assert "outside the source folder" in reasons["leak.png"]
    assert (
        "caption file 0.txt" in reasons["0.jpg"] and "outside the source folder" in reasons["0.jpg"]
    )
    written = shard_bytes(tmp_path / "shards")
    assert (tmp_path / "secret.png").read_bytes() not in written and b"swordfish" not in written
    assert (
        summary["splits"]["train"]["samples"] == 6 - 1
    )  # the good images (dog/0.jpg lost its caption)

    # manifest rows that climb out of the folder or name an absolute path
    (source / "labels.csv").write_text(
        f"path,label,split\ntrain/cat/1.png,cat,train\n../secret.png,cat,train\n"
        f"{tmp_path / 'secret.png'},dog,train\n"
    )
    summary = write_shards(
        source, tmp_path / "manifest", "image", splits=("train",), manifest="labels.csv"
    )
    skipped = summary["splits"]["train"]["skipped"]
    assert len(skipped) == 2 and all("outside the source folder" in s["reason"] for s in skipped)
    assert summary["splits"]["train"]["samples"] == 1
    assert (tmp_path / "secret.png").read_bytes() not in shard_bytes(tmp_path / "manifest")
    assert {
        p: (p.read_bytes(), p.stat().st_mtime_ns) for p in outside
    } == outside  # nothing outside touched


def test_write_shards_decodes_every_file_and_ships_nothing_undecodable(tmp_path, capsys):
    source = tmp_path / "src"
    write_images(source / "train", per_class=2)
    (source / "train" / "cat" / "notes.png").write_text("not an image")
    (source / "train" / "cat" / "cut.png").write_bytes(png_bytes(5)[:40])
    Image.new("L", (5000, 5000)).save(
        source / "train" / "dog" / "huge.png"
    )  # above the loaders' max_pixels
    Image.new("RGB", (200, 200)).save(
        source / "train" / "dog" / "big_file.bmp"
    )  # 120 KB: above 100K below
    out = tmp_path / "shards"
    assert (
        exit_status(
            [
                "write",
                str(source),
                str(out),
                "--modality",
                "image",
                "--splits",
                "train",
                "--max-member-bytes",
                "100K",
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["splits"]["train"]["skipped"]}
    assert sorted(reasons) == ["big_file.bmp", "cut.png", "huge.png", "notes.png"]
    assert "UnidentifiedImageError" in reasons["notes.png"]
    assert "max_pixels=16777216" in reasons["huge.png"]
    assert "more than --max-member-bytes=102400" in reasons["big_file.bmp"]
    shards = ImageShards(str(out), "train", image_size=8)
    assert len(shards) == 4 and all(
        shards[i] is not None for i in range(len(shards))
    )  # every shipped file decodes
    assert (
        exit_status(
            [
                "write",
                str(source),
                str(tmp_path / "raised"),
                "--modality",
                "image",
                "--splits",
                "train",
                "--max-pixels",
                "25000000",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "huge.png" not in capsys.readouterr().out  # the limit is the writer's option too


def test_skipped_files_rows_cannot_be_forged_by_file_names(tmp_path, caplog):
    record = tmp_path / "skipped_files.tsv"
    policy = BadFilePolicy("skip", record)
    forged = "dir/a.png\tnot the reason\nforged/row.png\tanother reason"
    policy.handle(forged, 'reason with a "quote"')
    policy.handle("dir/plain.png", "UnidentifiedImageError: cannot identify image file")
    folder = tmp_path / "images" / "train" / "cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "good.png")
    (folder / "evil\tname\nrow.png").write_text(
        "not an image"
    )  # a real file name with a tab and a newline
    dataset = ImageFolder(str(tmp_path / "images"), "train", image_size=4)
    dataset.bad_files.record_path = record
    assert [dataset[i] is None for i in range(len(dataset))].count(True) == 1
    with open(record, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, dialect="excel-tab"))
    assert [len(row) for row in rows] == [2, 2, 2]
    assert rows[0] == [forged, 'reason with a "quote"']
    assert rows[1] == ["dir/plain.png", "UnidentifiedImageError: cannot identify image file"]
    assert rows[2][0] == str(folder / "evil\tname\nrow.png") and "cannot identify" in rows[2][1]
    plain = "dir/plain.png\tUnidentifiedImageError: cannot identify image file\n"
    assert plain in record.read_text(
        encoding="utf-8"
    )  # rows without a tab, newline or quote stay plain
    assert (
        "skipping dir/a.png\\tnot the reason\\nforged/row.png" in caplog.text
    )  # the warning stays one line


# --- tar shards -----------------------------------------------------------------------------------


def long_name_header_claiming(size: int) -> bytes:
    """A GNU long-name header whose size field (base-256) claims `size` bytes of name, in a file of
    2 KB."""
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    block[124:136] = b"\x80" + size.to_bytes(11, "big")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block[:512])
    return bytes(block) + b"x" * 512 + bytes(1024)


def test_tar_member_names_cannot_exhaust_memory(tmp_path):
    members = {"000000.png": png_bytes(10), "000000.cls": b"0"}
    members.update({f"{k:06d}.png": b"" for k in range(1, 2001)})
    members["x" * 600_000 + ".png"] = (
        b""  # as a fixed-width key array: 2002 x 600000 x 4 bytes = 4.8 GB
    )
    long_name = tmp_path / "long"
    write_tar(long_name / "train-000000.tar", members)
    assert (long_name / "train-000000.tar").stat().st_size < 2_000_000
    (tmp_path / "claim").mkdir()
    (tmp_path / "claim" / "train-000000.tar").write_bytes(long_name_header_claiming(6 << 30))
    output = run_bounded(f"""
        from selfflow.data.shards.dataset import ImageShards
        shards = ImageShards({str(long_name)!r}, "train", image_size=4)
        print("samples:", len(shards))
        last = shards.member_name(len(shards) - 1)
        print("long name:", last, "|", refusal(lambda: shards.load(2001)))
        print("first:", refusal(lambda: shards.load(0)))
        print("claim:", refusal(lambda: ImageShards({str(tmp_path / "claim")!r}, "train")))
        """)
    found = lines_of(output)
    assert found["samples"] == "2002" and found["first"] == "loaded"
    assert "/train-000000.tar/xxxxxxxx" in found["long name"] and "x..." in found["long name"]
    assert "member name has 600004 characters, more than 1024" in found["long name"]
    assert "claim/train-000000.tar is truncated or corrupt" in found["claim"]
    assert "MemoryError" not in output

    members = {f"{k:06d}.png": png_bytes(k % 256) for k in range(2000)}
    members["k" * 1000 + ".png"] = png_bytes(
        1
    )  # a long key within the limit costs its own length only
    write_tar(tmp_path / "keys" / "train-000000.tar", members)
    keys = ImageShards(str(tmp_path / "keys"), "train", image_size=4).keys
    assert keys[2000] == "k" * 1000 and keys[7] == "000007"
    assert (
        keys.data.nbytes + keys.offsets.nbytes < 40_000
    )  # fixed-width text: 2001 x 1000 x 4 bytes = 8 MB


def test_class_counts_and_class_lists_from_a_shard_are_bounded(tmp_path):
    write_tar(
        tmp_path / "big_index" / "train-000000.tar",
        {
            "000000.png": png_bytes(1),
            "000000.cls": b"999999999",  # 9 bytes: a billion class names if believed
            "000001.png": png_bytes(2),
            "000001.cls": b"1",
        },
    )
    many = tmp_path / "many"  # 3M names, more bytes than a class list needs
    write_tar(many / "train-000000.tar", {"000000.png": png_bytes(1), "000000.cls": b"0"})
    (many / "classes.json").write_text(
        json.dumps({"class_names": [str(i) for i in range(3_000_000)]})
    )
    too_many = tmp_path / "too_many"  # 1.2M short names in 6 MB: more classes than max_classes
    write_tar(too_many / "train-000000.tar", {"000000.png": png_bytes(1), "000000.cls": b"0"})
    (too_many / "classes.json").write_text(json.dumps({"class_names": ["ab"] * 1_200_000}))
    output = run_bounded(f"""
        from selfflow.data.shards.dataset import ImageShards
        shards = ImageShards({str(tmp_path / "big_index")!r}, "train", image_size=4)
        print("names:", shards.class_names)
        print("index:", refusal(lambda: shards.load(0)))
        print("many:", refusal(lambda: ImageShards({str(many)!r}, "train")))
        print("too many:", refusal(lambda: ImageShards({str(too_many)!r}, "train")))
        """)
    found = lines_of(output)
    assert found["names"] == "['0', '1']"
    assert (
        "class index 999999999 is not below data.dataset.max_classes=100000; raise it"
        in found["index"]
    )
    assert "many/classes.json is larger than 8388608 bytes" in found["many"]
    assert "names 1200000 classes, more than data.dataset.max_classes=100000" in found["too many"]
    assert "MemoryError" not in output

    shapes = {
        "string": {"class_names": "cats and dogs"},
        "list": ["cat", "dog"],
        "nested": {"class_names": [["a"]]},
        "missing": {"names": ["cat"]},
    }
    for content in shapes.values():
        (many / "classes.json").write_text(json.dumps(content))
        with pytest.raises(
            ValueError,
            match=r"classes\.json is not a class list \(\"class_names\" must be a list "
            r"of names\); it must be JSON like",
        ):
            ImageShards(str(many), "train")
    (many / "classes.json").write_text(json.dumps({"class_names": ["a" * 300]}))
    with pytest.raises(ValueError, match="a class name of 300 characters, more than 256"):
        ImageShards(str(many), "train")


def test_a_huge_member_is_refused_before_it_is_read(tmp_path):
    shard = tmp_path / "s" / "train-000000.tar"
    write_tar(shard, {"000000.png": png_bytes(3)})
    with tarfile.open(shard) as tar:
        tar.getmembers()
        head = shard.read_bytes()[: tar.offset]  # without the end-of-archive blocks
    info = tarfile.TarInfo("000001.png")
    info.size = 1 << 30
    with open(shard, "wb") as f:  # a sparse file: 1 GB long, a few KB on disk
        f.write(head + info.tobuf(format=tarfile.USTAR_FORMAT))
        f.seek(f.tell() + info.size)
        f.write(bytes(1024))
    output = run_bounded(f"""
        from selfflow.data.shards.dataset import ImageShards
        shards = ImageShards({str(shard.parent)!r}, "train", image_size=4)
        print("huge:", refusal(lambda: shards.load(1)))
        print("first:", refusal(lambda: shards.load(0)))
        """)
    found = lines_of(output)
    assert (
        found["huge"] == "its data member has 1073741824 bytes, more than 268435456"
        and found["first"] == "loaded"
    )
    raised = ImageShards(str(shard.parent), "train", image_size=4, max_member_bytes=1 << 31)
    assert (
        raised.problems == {} and raised.data_members[1, 2] == 1 << 30
    )  # the key raises the limit


def test_link_members_are_skipped_and_listed_not_a_start_up_stop(tmp_path):
    shard = tmp_path / "s" / "train-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for name, data in (("000000.png", png_bytes(10)), ("000000.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for key, kind, target in (
            ("000001", tarfile.SYMTYPE, "/etc/passwd"),
            ("000002", tarfile.LNKTYPE, "000000.png"),
        ):
            link = tarfile.TarInfo(f"{key}.png")
            link.type, link.linkname = kind, target
            tar.addfile(link)
            label = tarfile.TarInfo(f"{key}.cls")
            label.size = 1
            tar.addfile(label, io.BytesIO(b"0"))
    record = tmp_path / "skipped_files.tsv"
    dataset = ImageShards(str(shard.parent), "train", image_size=4)
    dataset.bad_files.record_path = record
    assert (
        len(dataset) == 3 and dataset[0] is not None and dataset[1] is None and dataset[2] is None
    )
    with open(record, newline="", encoding="utf-8") as tsv:
        rows = dict(csv.reader(tsv, dialect="excel-tab"))
    assert "is a symbolic link, not file data" in rows[f"{shard}/000001.png"]
    assert "is a hard link, not file data" in rows[f"{shard}/000002.png"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "s",
        "skipped_files.tsv",
        "train-000000.tar",
    ]


def append_members(shard: Path, members: list[tuple[str, bytes]]) -> None:
    """Members appended to a shard, in order (a name may repeat)."""
    with tarfile.open(shard, "a") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_duplicated_keys_are_skipped_not_merged(tmp_path):
    shard = write_tar(
        tmp_path / "s" / "train-000000.tar",
        {
            "000000.png": png_bytes(10),
            "000000.cls": b"0",
            "000001.png": png_bytes(20),
            "000001.cls": b"1",
            "000002.cls": b"0",  # the group of 000002 ...
            "000003.png": png_bytes(30),
            "000003.cls": b"1",
        },
    )
    append_members(
        shard, [("000002.png", png_bytes(40))]
    )  # ... and 000002 again, after another key
    record = tmp_path / "skipped_files.tsv"
    dataset = ImageShards(str(shard.parent), "train", image_size=4)
    dataset.bad_files.record_path = record
    assert len(dataset) == 5
    assert [dataset[i] is None for i in range(5)] == [False, False, True, False, True]
    assert dataset[3][1] == 1 and torch.allclose(dataset[3][0], torch.full((3, 4, 4), 30 / 255))
    with open(record, newline="", encoding="utf-8") as tsv:
        rows = dict(csv.reader(tsv, dialect="excel-tab"))
    assert len(rows) == 2 and all(
        "appears more than once in the shard" in reason for reason in rows.values()
    )

    twice = write_tar(
        tmp_path / "t" / "train-000000.tar", {"000000.png": png_bytes(10), "000000.cls": b"0"}
    )
    append_members(
        twice, [("000001.png", png_bytes(1)), ("000001.cls", b"1"), ("000001.png", png_bytes(2))]
    )
    dataset = ImageShards(str(twice.parent), "train", image_size=4)
    assert len(dataset) == 2 and dataset[0] is not None and dataset[1] is None


# --- audio ----------------------------------------------------------------------------------------


def test_common_rate_pairs_resample_exactly_as_before():
    rates = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 96000)
    assert all(resampling_rates(s, t) == (s, t) for s in rates for t in rates)
    p, q = resampling_rates(44099, 8000)
    assert p * q <= 1 << 20 and abs(p / q / (44099 / 8000) - 1) < 1e-5


def test_odd_sample_rates_resample_through_a_bounded_filter(tmp_path):
    for rate in (44099, 767999):
        t = np.arange(int(0.25 * rate)) / rate
        soundfile.write(
            tmp_path / f"{rate}.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate
        )
    absurd = bytearray((tmp_path / "44099.wav").read_bytes())
    absurd[24:28] = (2**31 - 1).to_bytes(4, "little")  # the header's sample rate: 2 GHz
    (tmp_path / "absurd.wav").write_bytes(bytes(absurd))
    output = run_bounded(f"""
        import numpy as np
        from selfflow.io.audio import read_audio
        for name in ("44099", "767999", "absurd"):
            waves = []
            path = {str(tmp_path)!r} + f"/{{name}}.wav"
            outcome = refusal(lambda: waves.append(read_audio(path, 8000, 2000)))
            if waves:
                spectrum = np.abs(np.fft.rfft(waves[0][0].numpy()))
                peak = np.argmax(spectrum) * 8000 / 2000
                outcome = f"{{tuple(waves[0].shape)}} peak at {{peak:.0f}} Hz"
            print(f"{{name}}: {{outcome}}")
        """)
    found = lines_of(output)
    assert found["44099"] == found["767999"] == "(1, 2000) peak at 440 Hz"
    assert found["absurd"] == (
        "its header claims 2147483647 Hz, above the 768000 Hz that any recording uses (a "
        "broken or hostile header)"
    )


def test_audio_is_read_a_block_at_a_time_whatever_the_channel_count(tmp_path, monkeypatch):
    """A few KB of compressed silence can hold many channels at a high rate (64 x 192 kHz: 400 MB a
    second of float samples): the mix to mono happens block by block."""
    many = np.zeros((2048, 1024), np.float32)
    many[::7] = 0.25
    soundfile.write(tmp_path / "many.wav", many, 8000, subtype="PCM_U8")
    reads = []
    original = soundfile.SoundFile.read

    def spy(self, frames=-1, *args, **kwargs):
        reads.append(frames * self.channels)
        return original(self, frames, *args, **kwargs)

    monkeypatch.setattr(soundfile.SoundFile, "read", spy)
    wave = read_audio(tmp_path / "many.wav", 8000, 2048)
    assert wave.shape == (1, 2048) and max(reads) <= READ_BLOCK_VALUES and len(reads) > 1
    assert torch.allclose(wave[0, ::7], torch.full((293,), 0.25), atol=1 / 128)


# --- video ----------------------------------------------------------------------------------------


def write_blank_video(path: Path, frames: int, width: int, height: int) -> Path:
    """Black H.264 frames, encoded fast: a small file whatever the frame size (MP4 keeps a frame
    count, MKV not)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(
            "libx264", rate=8, options={"preset": "ultrafast", "crf": "51"}
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        frame = av.VideoFrame(width, height, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        for _ in range(frames):
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_huge_video_frames_are_refused_before_decoding(tmp_path):
    video = write_blank_video(tmp_path / "v" / "train" / "a" / "huge.mp4", 8, 4096, 4096)
    assert video.stat().st_size < 100_000  # 8 frames of 4096x4096: 400 MB as uint8, 1.6 GB as float
    write_blank_video(tmp_path / "v" / "train" / "a" / "small.mp4", 8, 64, 48)
    member = tmp_path / "s" / "train-000000.tar"
    write_tar(
        member,
        {
            "000000.mp4": (tmp_path / "v" / "train" / "a" / "small.mp4").read_bytes(),
            "000001.mp4": video.read_bytes(),
        },
    )
    output = run_bounded(f"""
        import numpy as np
        from selfflow.data.folders.video_folder import VideoFolder
        from selfflow.data.shards.dataset import VideoShards
        from selfflow.io.video import frames_to_tensor
        for backend in ("auto", "pyav"):
            folder = VideoFolder({str(tmp_path / "v")!r}, "train", num_frames=8, backend=backend)
            huge = folder.paths.index(folder.paths[0].parent / "huge.mp4")
            print(f"folder {{backend}}:", refusal(lambda: folder.load(folder.paths[huge])))
            raised = VideoFolder({str(tmp_path / "v")!r}, "train", num_frames=8, backend=backend,
                                 max_frame_pixels=1 << 25, max_clip_pixels=1 << 25)
            print(f"raised {{backend}}:", refusal(lambda: raised.load(folder.paths[huge])))
        shards = VideoShards({str(member.parent)!r}, "train", num_frames=8)
        print("shard:", refusal(lambda: shards.load(1)))
        # within the default limits: 100 MB, 400 MB as float
        frames = np.zeros((8, 2048, 2048, 3), np.uint8)
        print("to tensor:", refusal(lambda: frames_to_tensor(frames, 32, 3)))
        """)
    found = lines_of(output)
    frame_limit = (
        "frames of 4096x4096 pixels are more than data.dataset.max_frame_pixels=8294400; raise it"
    )
    assert found["folder auto"].startswith(frame_limit) and found["folder pyav"].startswith(
        frame_limit
    )
    assert found["shard"].startswith(frame_limit)
    clip_limit = (
        "a clip of 8 frames of 4096x4096 pixels is more than "
        "data.dataset.max_clip_pixels=33554432; raise it"
    )
    assert found["raised auto"].startswith(clip_limit) and found["raised pyav"].startswith(
        clip_limit
    )
    assert found["to tensor"] == "loaded"
    assert "MemoryError" not in output


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_pyav_keeps_only_the_frames_of_the_clip(tmp_path, container):
    """A clip spanning a long video (first and last frame): PyAV decodes it all but keeps
    two frames, whether the container knows its frame count (MP4) or not (MKV: counted in a
    first pass)."""
    video = write_blank_video(tmp_path / f"long.{container}", 160, 1280, 720)  # 160 x 2.8 MB as RGB
    output = run_bounded(
        f"""
        from selfflow.io.video import read_clip
        clips = []
        read = lambda: clips.append(read_clip({str(video)!r}, 2, frame_stride=159, backend="pyav"))
        print("clip:", refusal(read))
        print("shape:", clips[0].shape if clips else None)
        """,
        headroom_mb=200,
    )
    found = lines_of(output)
    assert found["clip"] == "loaded" and found["shape"] == "(2, 720, 1280, 3)"


# --- images ---------------------------------------------------------------------------------------


def test_the_image_pixel_limit_is_a_config_key_counted_as_decoded(tmp_path):
    from hydra.utils import instantiate

    root = tmp_path / "images" / "train" / "photos"
    root.mkdir(parents=True)
    Image.new("RGB", (6000, 4000), (200, 10, 10)).save(
        root / "camera.jpg", quality=80
    )  # 24 MP: decoded at 1/8
    Image.new("L", (5000, 5000)).save(root / "scan.png")  # 25M pixels, as decoded
    Image.new("RGB", (40, 40)).save(root / "small.png")
    dataset = ImageFolder(str(tmp_path / "images"), "train", image_size=64)
    record = tmp_path / "skipped.tsv"
    dataset.bad_files.record_path = record
    items = {path.name: dataset[i] for i, path in enumerate(dataset.paths)}
    assert items["camera.jpg"][0].shape == (3, 64, 64) and items["camera.jpg"][0][0].mean() > 0.7
    assert items["scan.png"] is None and items["small.png"] is not None
    assert (
        "5000x5000 pixels is more than data.dataset.max_pixels=16777216; raise it"
        in record.read_text()
    )

    cfg = compose_train(
        ["data=image_folder", f"data.root={tmp_path / 'images'}", "data.dataset.max_pixels=1000"],
        tmp_path / "run",
    )
    limited = instantiate(cfg.data.dataset)(split="train")
    limited.bad_files.record_path = tmp_path / "limited.tsv"
    assert all(limited[i] is None for i in range(len(limited)))
    assert (
        "40x40 pixels is more than data.dataset.max_pixels=1000"
        in (tmp_path / "limited.tsv").read_text()
    )
