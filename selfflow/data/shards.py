"""WebDataset tar shards as map-style datasets of images, audio clips or video clips.

A shard is an uncompressed tar whose members are grouped into samples by key, the member name up to the first dot
of its file name: `000123.jpg` (the data), `000123.cls` (the class index as text, optional), `000123.txt` (a
caption, optional). `classes.json` next to the shards names the classes. `tools/write_shards.py` writes this layout
from a folder. The tar headers are scanned once at start-up (no member data is read); an item is one seek and read
per member, so the datasets have a length and random access, and the exact-resume sampler works unchanged.
Decoding goes through the same functions as the folder datasets: a shard item equals the folder item of its file.

Shards are data from others: every size, count and name read from them is bounded before memory is allocated
(`MAX_*` below and the `max_*` options), and a sample that breaks a rule (a link member, a name too long, a key
that appears twice, a member too large) is skipped and listed like an unreadable file, never a start-up stop.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from selfflow.data.audio_io import AUDIO_EXTENSIONS, read_audio
from selfflow.data.bad_files import BadFilePolicy, UnusableSample, failure_reason, require_one_readable
from selfflow.data.image_folder import IMAGE_EXTENSIONS, MAX_PIXELS, check_image_options, load_image
from selfflow.data.video_folder import check_clip_options
from selfflow.data.video_io import MAX_CLIP_PIXELS, MAX_FRAME_PIXELS, VIDEO_EXTENSIONS, frames_to_tensor, read_clip

log = logging.getLogger("selfflow.data")

CLASSES_FILE = "classes.json"
LABEL_EXTENSION = "cls"
CAPTION_EXTENSION = "txt"
TAR_BLOCK = 512
WRITE_HINT = "write shards from a folder with: python tools/write_shards.py SOURCE_FOLDER SHARD_FOLDER --modality M"
MAX_KEY_CHARS = 1024  # a sample key (a member's name up to its first dot): real keys are short ("000123")
MAX_LABEL_BYTES = 32  # a .cls member: one class index as text
MAX_CAPTION_BYTES = 64 << 10  # a .txt member
MAX_CLASSES_FILE_BYTES = 8 << 20  # classes.json: 100k class names of 80 characters
MAX_CLASS_NAME_CHARS = 256  # a class name becomes part of sample file names
MAX_CLASSES = 100_000  # the default of data.train.max_classes: the model gets one label embedding per class
MAX_MEMBER_BYTES = 256 << 20  # the default of data.train.max_member_bytes: a data member is read whole, per worker
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """`train-{000000..000002}.tar` -> train-000000.tar, train-000001.tar, train-000002.tar; `{a,b}` alternatives;
    several groups expand as a product. Numbers keep the width of the range's first bound."""
    match = _BRACE.search(pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise ValueError(f"shard pattern {pattern!r} has an unbalanced brace; write e.g. "
                             f"'dir/train-{{000000..000009}}.tar'")
        return [pattern]
    body, head, tail = match[1], pattern[:match.start()], pattern[match.end():]
    numbers = _RANGE.match(body)
    if numbers:
        first, last = int(numbers[1]), int(numbers[2])
        if last < first:
            raise ValueError(f"shard pattern {pattern!r}: the range {{{body}}} runs backwards")
        width = len(numbers[1])
        choices = [f"{n:0{width}d}" for n in range(first, last + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(f"shard pattern {pattern!r}: {{{body}}} is neither a range {{000000..000009}} nor a list "
                         f"{{a,b}}")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def _split_files(folder: Path, split: str) -> list[Path]:
    for name in (split, "val") if split == "test" else (split,):
        found = sorted(p for p in folder.glob(f"{name}-*.tar") if p.is_file())
        if found:
            return found
    others = sorted(folder.glob("*.tar"))
    if others:
        raise FileNotFoundError(f"{folder} holds shards ({others[0].name}, ...) but none named {split}-*.tar for "
                                f"split={split!r}; name them <split>-NNNNNN.tar or give data.{split}.root as a list "
                                f"or a pattern like 'dir/{split}-{{000000..000009}}.tar'")
    raise FileNotFoundError(f"no {split}-*.tar shards in {folder}; {WRITE_HINT}")


def resolve_shards(root: str | os.PathLike | Sequence, split: str) -> list[Path]:
    """The shard files of one split: `root` is a folder (its `<split>-*.tar`, `val-*.tar` for test when there is
    no `test-*.tar`), a tar file, a brace pattern, or a list of those. `{split}` in a path is the split's name."""
    items = [root] if isinstance(root, (str, os.PathLike)) else list(root)
    if not items:
        raise ValueError(f"data.{split}.root is an empty list of shards; {WRITE_HINT}")
    shards: list[Path] = []
    for item in items:
        text = os.fspath(item).replace("{split}", split)
        for name in expand_braces(text):
            path = Path(name).expanduser()
            if path.is_dir():
                shards += _split_files(path, split)
            elif path.is_file():
                shards.append(path)
            else:
                raise FileNotFoundError(f"shard {path} does not exist (data.root={os.fspath(item)!r}); {WRITE_HINT}")
    return shards


def sample_key(member_name: str) -> tuple[str, str]:
    """`dir/000123.seg.png` -> ("dir/000123", "seg.png"): the WebDataset key and extension of a tar member."""
    folder, _, base = member_name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


@dataclass
class ScannedSample:
    """One sample of a shard: consecutive members sharing a key. `problem`: why it cannot be used (read as a bad
    file when drawn), None when it can."""

    key: str
    members: dict[str, tuple[int, int]]  # extension -> (data offset, size); size -1: not file data
    problem: str | None = None


class _ReadsWithinFile:
    """A shard file whose reads never ask for more than the bytes left in it: tarfile reads a long-name or pax
    header in one read of the size that header claims, and Python allocates that size before reading."""

    def __init__(self, file: BinaryIO, size: int):
        self.file, self.size = file, size

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.file.tell())
        return self.file.read(left if n is None or n < 0 else min(n, left))

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()


_MEMBER_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a device",
                 tarfile.BLKTYPE: "a device", tarfile.FIFOTYPE: "a named pipe", tarfile.GNUTYPE_SPARSE: "a sparse file"}


def _shortened(name: str, keep: int = 60) -> str:
    return name if len(name) <= keep else f"{name[:keep]}..."


def _scan_shard(path: Path) -> list[ScannedSample]:
    """The samples of a shard in tar order (WebDataset groups consecutive members by key); directories are passed
    over. A member that is not file data (a link, device, pipe), a name longer than MAX_KEY_CHARS, a key that
    appears twice (two groups, or one extension twice: which data goes with which label is unknown) make the
    sample's `problem`.

    A truncated or corrupt shard raises: besides tarfile's own checks, every member's data must lie inside the file
    and the archive must end with tar's zero block (tarfile stops silently at a broken header after the first)."""
    size = path.stat().st_size
    samples: list[ScannedSample] = []
    first_of_key: dict[str, int] = {}
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=_ReadsWithinFile(raw, size), mode="r:") as tar:
            while (member := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every header it reads; nothing here looks one up again
                if member.isdir():
                    continue
                regular = member.isfile() and not member.issparse()
                if regular and member.offset_data + member.size > size:
                    raise tarfile.ReadError(f"member {_shortened(member.name)} runs past the end of the file")
                if len(member.name) > MAX_KEY_CHARS:
                    samples.append(ScannedSample(_shortened(member.name), {}, (
                        f"its member name has {len(member.name)} characters, more than {MAX_KEY_CHARS}; name "
                        f"samples with short keys such as 000123")))
                    continue
                key, extension = sample_key(member.name)
                if not samples or samples[-1].key != key:  # a new group of members
                    samples.append(ScannedSample(key, {}))
                    if key in first_of_key:
                        samples[first_of_key[key]].problem = samples[-1].problem = _DUPLICATE_KEY
                    first_of_key.setdefault(key, len(samples) - 1)
                sample = samples[-1]
                if extension in sample.members:
                    sample.problem = _DUPLICATE_KEY
                sample.members[extension] = (member.offset_data, member.size) if regular else (0, -1)
                if not regular:
                    sample.problem = sample.problem or (
                        f"its member {_shortened(member.name)} is {_MEMBER_KINDS.get(member.type, 'no regular file')}"
                        f", not file data; shards hold regular files only")
            end = tar.offset
        with open(path, "rb") as f:
            f.seek(end)
            if f.read(TAR_BLOCK) != bytes(TAR_BLOCK):
                raise tarfile.ReadError(f"no end-of-archive block at byte {end}: the file is truncated or a header "
                                        f"there is corrupt")
    except (tarfile.TarError, EOFError, ValueError, OverflowError, RecursionError) as error:
        raise ValueError(f"shard {path} is truncated or corrupt ({str(error)[:200]}); write it again "
                         f"(tools/write_shards.py --overwrite) or leave it out of data.root") from None
    return samples


_DUPLICATE_KEY = ("its key appears more than once in the shard (members are grouped by key), so which data goes "
                  "with which label is unknown; write the shard again with one group of members per key")


def read_class_names(folder: Path, modality: str, max_classes: int = MAX_CLASSES) -> list[str] | None:
    """The class names in `folder/classes.json` ({"class_names": [...], "modality": ...}), None without the file;
    a file too large, of another shape or naming more than `max_classes` classes is refused before it is used."""
    path = folder / CLASSES_FILE
    if not path.is_file():
        return None
    example = 'it must be JSON like {"class_names": ["cat", "dog"], "modality": "image"}'
    with open(path, "rb") as f:
        text = f.read(MAX_CLASSES_FILE_BYTES + 1)
    if len(text) > MAX_CLASSES_FILE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_CLASSES_FILE_BYTES} bytes, far more than a class list needs; "
                         f"{example}")
    try:
        info = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{path} is not JSON ({type(error).__name__}: {str(error)[:120]}); {example}") from None
    names = info.get("class_names") if isinstance(info, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, (str, int)) and not isinstance(n, bool) for n in names):
        raise ValueError(f"{path} is not a class list (\"class_names\" must be a list of names); {example}")
    if len(names) > max_classes:
        raise ValueError(f"{path} names {len(names)} classes, more than data.train.max_classes={max_classes}; raise "
                         f"it if the shards really hold that many classes")
    names = [str(name) for name in names]
    longest = max(names, key=len, default="")
    if len(longest) > MAX_CLASS_NAME_CHARS:
        raise ValueError(f"{path} holds a class name of {len(longest)} characters, more than "
                         f"{MAX_CLASS_NAME_CHARS}; shorten it")
    written_for = info.get("modality")
    if written_for not in (None, modality):
        shown = _shortened(str(written_for), 20)
        raise ValueError(f"the shards next to {path} hold {shown} samples, not {modality}; use data={shown}_shards")
    return names


class PackedStrings:
    """Many strings in two numpy arrays (UTF-8 bytes and offsets): DataLoader workers share the pages instead of
    copying them on every read (no reference counts), and a long string costs its own length only (a fixed-width
    array would give every entry the width of the longest)."""

    def __init__(self, strings: list[str]):
        encoded = [text.encode("utf-8", "surrogateescape") for text in strings]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)  # [N + 1]
        np.cumsum([len(data) for data in encoded], out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)  # [total bytes]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")


class ShardDataset(Dataset):
    """Items `(decode(data member), label)` from tar shards; an item whose member cannot be read or decoded is None
    (see `collate_samples`) or, with on_bad_file=error, stops the run. Subclasses set `modality`, `extensions`
    and `decode`.

    max_member_bytes: a data member is read whole into memory, so larger ones are skipped; max_classes: more
    classes in classes.json stop the start-up, a larger class index makes its sample bad.
    """

    modality = ""
    extensions: tuple[str, ...] = ()

    def __init__(self, root: str | os.PathLike | Sequence, split: str = "train", on_bad_file: str = "skip",
                 max_member_bytes: int = MAX_MEMBER_BYTES, max_classes: int = MAX_CLASSES):
        if max_member_bytes < 1 or max_classes < 1:
            raise ValueError(f"data.train.max_member_bytes={max_member_bytes} and max_classes={max_classes} must be "
                             f"positive")
        self.bad_files = BadFilePolicy(on_bad_file)
        self.split, self.max_member_bytes, self.max_classes = split, max_member_bytes, max_classes
        self.shards = resolve_shards(root, split)
        # before the scan: names a wrong modality
        names = read_class_names(self.shards[0].parent, self.modality, max_classes)
        self.data_extensions = tuple(e.lstrip(".") for e in self.extensions)
        keys, data_ext, data, labels, captions = [], [], [], [], []
        self.problems: dict[int, str] = {}  # sample index -> why it cannot be used (see ScannedSample)
        for shard_index, shard in enumerate(self.shards):
            for sample in _scan_shard(shard):
                extension = next((e for e in sample.members if e in self.data_extensions), None)
                if extension is None and sample.problem is None:
                    raise ValueError(f"sample {sample.key} of shard {shard} has no {self.modality} member (it holds "
                                     f"{sorted(sample.members)}; expected one of {list(self.data_extensions)}); "
                                     f"check data=<modality>_shards or write the shards again")
                if sample.problem is not None:
                    self.problems[len(keys)] = sample.problem
                keys.append(sample.key)
                data_ext.append(-1 if extension is None else self.data_extensions.index(extension))
                data.append((shard_index, *sample.members.get(extension, (0, -1))))
                labels.append((shard_index, *sample.members.get(LABEL_EXTENSION, (0, -1))))
                captions.append((shard_index, *sample.members.get(CAPTION_EXTENSION, (0, -1))))
        if not keys:
            raise ValueError(f"the {len(self.shards)} shards of split={split!r} ({self.shards[0]}, ...) hold no "
                             f"samples; {WRITE_HINT}")
        self.keys = PackedStrings(keys)  # [N]
        self.data_ext = np.asarray(data_ext, dtype=np.int8)  # [N] index into data_extensions; -1: none
        self.data_members = np.asarray(data, dtype=np.int64)  # [N, 3]: shard, offset, size; size -1: no data
        self.label_members = np.asarray(labels, dtype=np.int64)  # [N, 3]; size -1: no label
        self.caption_members = np.asarray(captions, dtype=np.int64)  # [N, 3]; size -1: no caption
        self.class_names = names if names is not None else self._class_names_from_labels()
        self.check_readable()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.keys)

    def decode(self, source: BinaryIO) -> Tensor:
        raise NotImplementedError

    def member_name(self, i: int) -> str:
        """`.../train-000000.tar/000123.jpg`: names the sample in warnings and skipped_files.tsv."""
        name = f"{self.shards[self.data_members[i, 0]]}/{self.keys[i]}"
        return name if self.data_ext[i] < 0 else f"{name}.{self.data_extensions[self.data_ext[i]]}"

    def _read(self, member: np.ndarray, limit: int, what: str) -> bytes:
        """A member's bytes, refused when larger than `limit` (it is read whole into memory)."""
        shard, offset, size = (int(v) for v in member)
        if size > limit:
            raise UnusableSample(f"its {what} member has {size} bytes, more than {limit}")
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise UnusableSample(f"shard {self.shards[shard]} is shorter than at start-up (changed while in use?)")
        return data

    def label(self, i: int) -> int:
        """The `.cls` member as an int; -1 without one."""
        if self.label_members[i, 2] < 0:
            return -1
        text = self._read(self.label_members[i], MAX_LABEL_BYTES, f".{LABEL_EXTENSION}")
        text = text.decode("utf-8", errors="replace").strip()
        if not re.fullmatch(r"-?\d+", text):
            raise UnusableSample(f"its .{LABEL_EXTENSION} member holds {text[:40]!r}, not a class index")
        label = int(text)
        if label >= self.max_classes:
            raise UnusableSample(f"class index {label} is not below data.train.max_classes={self.max_classes}; "
                                 f"raise it if the shards really hold that many classes")
        if label < -1 or (self.class_names and label >= self.num_classes):
            raise UnusableSample(f"class index {label} is out of range for the {self.num_classes} classes of "
                                 f"{CLASSES_FILE}")
        return label

    def caption(self, i: int) -> str | None:
        """The `.txt` member, None without one."""
        if self.caption_members[i, 2] < 0:
            return None
        data = self._read(self.caption_members[i], MAX_CAPTION_BYTES, f".{CAPTION_EXTENSION}")
        return data.decode("utf-8", errors="replace").strip()

    def load(self, i: int) -> tuple[Tensor, int]:
        if i in self.problems:
            raise UnusableSample(self.problems[i])
        data = self._read(self.data_members[i], self.max_member_bytes, "data")
        return self.decode(io.BytesIO(data)), self.label(i)

    def _class_names_from_labels(self) -> list[str]:
        """Without classes.json: read the (tiny) label members once; the names are the indices as text (at most
        max_classes: a larger index makes its sample bad)."""
        self.class_names = []  # no range check against classes.json while reading
        top = -1
        for i in np.flatnonzero(self.label_members[:, 2] >= 0):
            try:
                top = max(top, self.label(int(i)))
            except Exception:  # noqa: BLE001 - an unreadable label makes its sample bad when it is read
                continue
        if top < 0:
            return []
        log.warning("no %s next to %s: the %d classes are named by index; tools/write_shards.py writes the names",
                    CLASSES_FILE, self.shards[0], top + 1)
        return [str(i) for i in range(top + 1)]

    def check_readable(self) -> None:
        """Fail at start-up when no sample can be read."""
        require_one_readable(len(self), self.load, self.member_name, self.bad_files,
                             f"samples of split={self.split!r}", "check data.root and data=<modality>_shards")

    def __getitem__(self, i: int):
        try:
            data, label = self.load(i)
        except Exception as error:  # noqa: BLE001 - any read or decode failure makes the sample unusable
            self.bad_files.handle(self.member_name(i), failure_reason(error))
            return None
        return data, label


class ImageShards(ShardDataset):
    """Images from shards as [channels, S, S] in [0, 1], decoded exactly like `ImageFolder`."""

    modality = "image"
    extensions = IMAGE_EXTENSIONS

    def __init__(self, root: str | os.PathLike | Sequence, split: str = "train", image_size: int = 32,
                 channels: int = 3, hflip: bool = False, on_bad_file: str = "skip", max_pixels: int = MAX_PIXELS,
                 max_member_bytes: int = MAX_MEMBER_BYTES, max_classes: int = MAX_CLASSES):
        check_image_options(channels, max_pixels)
        self.image_size, self.channels, self.max_pixels = image_size, channels, max_pixels
        self.hflip = hflip and split == "train"
        super().__init__(root, split, on_bad_file, max_member_bytes, max_classes)

    def decode(self, source: BinaryIO) -> Tensor:
        """image: [C, S, S]"""
        return load_image(source, self.image_size, self.channels, self.max_pixels)

    def load(self, i: int) -> tuple[Tensor, int]:
        image, label = super().load(i)
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, label


class AudioShards(ShardDataset):
    """Recordings from shards as mono clips [1, S], decoded exactly like `AudioFolder`."""

    modality = "audio"
    extensions = AUDIO_EXTENSIONS

    def __init__(self, root: str | os.PathLike | Sequence, split: str = "train", sample_rate: int = 8000,
                 duration: float = 1.0, resample: bool = True, min_peak: float = 1e-4, on_bad_file: str = "skip",
                 max_member_bytes: int = MAX_MEMBER_BYTES, max_classes: int = MAX_CLASSES):
        if sample_rate <= 0 or duration <= 0:
            raise ValueError(f"data.train.sample_rate={sample_rate} and duration={duration} must be positive")
        self.sample_rate, self.num_samples = int(sample_rate), round(sample_rate * duration)
        self.resample, self.min_peak = resample, min_peak
        self.random_crop = split == "train"
        super().__init__(root, split, on_bad_file, max_member_bytes, max_classes)

    def decode(self, source: BinaryIO) -> Tensor:
        """wave: [1, S]"""
        return read_audio(source, self.sample_rate, self.num_samples, self.random_crop, self.resample, self.min_peak)


class VideoShards(ShardDataset):
    """Videos from shards as clips [T, C, S, S] in [0, 1], decoded in memory exactly like `VideoFolder`."""

    modality = "video"
    extensions = VIDEO_EXTENSIONS

    def __init__(self, root: str | os.PathLike | Sequence, split: str = "train", num_frames: int = 8,
                 frame_stride: int = 1, fps: float | None = None, image_size: int = 32, channels: int = 3,
                 backend: str = "auto", on_bad_file: str = "skip", max_frame_pixels: int = MAX_FRAME_PIXELS,
                 max_clip_pixels: int = MAX_CLIP_PIXELS, max_member_bytes: int = MAX_MEMBER_BYTES,
                 max_classes: int = MAX_CLASSES):
        check_clip_options(num_frames, frame_stride, fps, channels, backend, max_frame_pixels, max_clip_pixels)
        self.num_frames, self.frame_stride, self.fps = num_frames, frame_stride, fps
        self.image_size, self.channels, self.backend = image_size, channels, backend
        self.max_frame_pixels, self.max_clip_pixels = max_frame_pixels, max_clip_pixels
        self.random_start = split == "train"
        super().__init__(root, split, on_bad_file, max_member_bytes, max_classes)

    def decode(self, source: BinaryIO) -> Tensor:
        """frames: [T, C, S, S]"""
        frames = read_clip(source, self.num_frames, self.frame_stride, self.fps, self.random_start, self.backend,
                           self.max_frame_pixels, self.max_clip_pixels)
        return frames_to_tensor(frames, self.image_size, self.channels)
