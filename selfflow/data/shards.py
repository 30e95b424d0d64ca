"""WebDataset tar shards as map-style datasets of images, audio clips or video clips.

A shard is an uncompressed tar whose members are grouped into samples by key, the member name up to the first dot
of its file name: `000123.jpg` (the data), `000123.cls` (the class index as text, optional), `000123.txt` (a
caption, optional). `classes.json` next to the shards names the classes. `tools/write_shards.py` writes this layout
from a folder. The tar headers are scanned once at start-up (no member data is read); an item is one seek and read
per member, so the datasets have a length and random access, and the exact-resume sampler works unchanged.
Decoding goes through the same functions as the folder datasets: a shard item equals the folder item of its file.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from selfflow.data.adm_crop import check_crop
from selfflow.data.audio_io import AUDIO_EXTENSIONS, read_audio
from selfflow.data.bad_files import BadFilePolicy, UnusableSample, failure_reason, require_one_readable
from selfflow.data.image_folder import IMAGE_EXTENSIONS, load_image
from selfflow.data.video_folder import check_clip_options
from selfflow.data.video_io import VIDEO_EXTENSIONS, frames_to_tensor, read_clip

log = logging.getLogger("selfflow.data")

CLASSES_FILE = "classes.json"
LABEL_EXTENSION = "cls"
CAPTION_EXTENSION = "txt"
TAR_BLOCK = 512
WRITE_HINT = "write shards from a folder with: python tools/write_shards.py SOURCE_FOLDER SHARD_FOLDER --modality M"
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


def _scan_shard(path: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """key -> {extension: (data offset, size)} of the regular members, in tar order.

    A truncated or corrupt shard raises: besides tarfile's own checks, every member's data must lie inside the file
    and the archive must end with tar's zero block (tarfile stops silently at a broken header after the first)."""
    size = path.stat().st_size
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    raise tarfile.ReadError(f"member {member.name} runs past the end of the file")
                key, extension = sample_key(member.name)
                samples.setdefault(key, {})[extension] = (member.offset_data, member.size)
            end = tar.offset
        with open(path, "rb") as f:
            f.seek(end)
            if f.read(TAR_BLOCK) != bytes(TAR_BLOCK):
                raise tarfile.ReadError(f"no end-of-archive block at byte {end}: the file is truncated or a header "
                                        f"there is corrupt")
    except (tarfile.TarError, EOFError) as error:
        raise ValueError(f"shard {path} is truncated or corrupt ({error}); write it again (tools/write_shards.py "
                         f"--overwrite) or leave it out of data.root") from None
    return samples


def read_class_names(folder: Path, modality: str) -> list[str] | None:
    """The class names in `folder/classes.json` ({"class_names": [...], "modality": ...}), None without the file."""
    path = folder / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        names = [str(name) for name in info["class_names"]]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a class list ({type(error).__name__}: {error}); it must be JSON like "
                         f'{{"class_names": ["cat", "dog"]}}') from None
    written_for = info.get("modality")
    if written_for not in (None, modality):
        raise ValueError(f"the shards next to {path} hold {written_for} samples, not {modality}; use "
                         f"data={written_for}_shards")
    return names


class ShardDataset(Dataset):
    """Items `(decode(data member), label)` from tar shards; an item whose member cannot be read or decoded is None
    (see `collate_samples`) or, with on_bad_file=error, stops the run. Subclasses set `modality`, `extensions`
    and `decode`."""

    modality = ""
    extensions: tuple[str, ...] = ()

    def __init__(self, root: str | os.PathLike | Sequence, split: str = "train", on_bad_file: str = "skip"):
        self.bad_files = BadFilePolicy(on_bad_file)
        self.split = split
        self.shards = resolve_shards(root, split)
        names = read_class_names(self.shards[0].parent, self.modality)  # before the scan: names a wrong modality
        self.data_extensions = tuple(e.lstrip(".") for e in self.extensions)
        keys, data_ext, data, labels, captions = [], [], [], [], []
        for shard_index, shard in enumerate(self.shards):
            samples = _scan_shard(shard)
            for key, members in samples.items():
                extension = next((e for e in members if e in self.data_extensions), None)
                if extension is None:
                    raise ValueError(f"sample {key} of shard {shard} has no {self.modality} member (it holds "
                                     f"{sorted(members)}; expected one of {list(self.data_extensions)}); check "
                                     f"data=<modality>_shards or write the shards again")
                keys.append(key)
                data_ext.append(self.data_extensions.index(extension))
                data.append((shard_index, *members[extension]))
                labels.append((shard_index, *members.get(LABEL_EXTENSION, (0, -1))))
                captions.append((shard_index, *members.get(CAPTION_EXTENSION, (0, -1))))
        if not keys:
            raise ValueError(f"the {len(self.shards)} shards of split={split!r} ({self.shards[0]}, ...) hold no "
                             f"samples; {WRITE_HINT}")
        # numpy, not lists of str: DataLoader workers share these pages instead of copying them on every read
        self.keys = np.asarray(keys)  # [N] fixed-width text
        self.data_ext = np.asarray(data_ext, dtype=np.int8)  # [N] index into data_extensions
        self.data_members = np.asarray(data, dtype=np.int64)  # [N, 3]: shard, offset, size
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
        extension = self.data_extensions[self.data_ext[i]]
        return f"{self.shards[self.data_members[i, 0]]}/{self.keys[i]}.{extension}"

    def _read(self, member: np.ndarray) -> bytes:
        shard, offset, size = (int(v) for v in member)
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
        text = self._read(self.label_members[i]).decode("utf-8", errors="replace").strip()
        if not re.fullmatch(r"-?\d+", text):
            raise UnusableSample(f"its .{LABEL_EXTENSION} member holds {text[:40]!r}, not a class index")
        label = int(text)
        if label < -1 or (self.class_names and label >= self.num_classes):
            raise UnusableSample(f"class index {label} is out of range for the {self.num_classes} classes of "
                                 f"{CLASSES_FILE}")
        return label

    def caption(self, i: int) -> str | None:
        """The `.txt` member, None without one."""
        if self.caption_members[i, 2] < 0:
            return None
        return self._read(self.caption_members[i]).decode("utf-8", errors="replace").strip()

    def load(self, i: int) -> tuple[Tensor, int]:
        return self.decode(io.BytesIO(self._read(self.data_members[i]))), self.label(i)

    def _class_names_from_labels(self) -> list[str]:
        """Without classes.json: read the (tiny) label members once; the names are the indices as text."""
        self.class_names = []  # no range check while reading
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
                 channels: int = 3, hflip: bool = False, on_bad_file: str = "skip", crop: str = "center"):
        if channels not in (1, 3):
            raise ValueError(f"data.train.channels={channels} must be 1 (grey) or 3 (RGB)")
        self.image_size, self.channels, self.crop = image_size, channels, check_crop(crop)
        self.hflip = hflip and split == "train"
        super().__init__(root, split, on_bad_file)

    def decode(self, source: BinaryIO) -> Tensor:
        """image: [C, S, S]"""
        return load_image(source, self.image_size, self.channels, crop=self.crop)

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
                 duration: float = 1.0, resample: bool = True, min_peak: float = 1e-4, on_bad_file: str = "skip"):
        if sample_rate <= 0 or duration <= 0:
            raise ValueError(f"data.train.sample_rate={sample_rate} and duration={duration} must be positive")
        self.sample_rate, self.num_samples = int(sample_rate), round(sample_rate * duration)
        self.resample, self.min_peak = resample, min_peak
        self.random_crop = split == "train"
        super().__init__(root, split, on_bad_file)

    def decode(self, source: BinaryIO) -> Tensor:
        """wave: [1, S]"""
        return read_audio(source, self.sample_rate, self.num_samples, self.random_crop, self.resample, self.min_peak)


class VideoShards(ShardDataset):
    """Videos from shards as clips [T, C, S, S] in [0, 1], decoded in memory exactly like `VideoFolder`."""

    modality = "video"
    extensions = VIDEO_EXTENSIONS

    def __init__(self, root: str | os.PathLike | Sequence, split: str = "train", num_frames: int = 8,
                 frame_stride: int = 1, fps: float | None = None, image_size: int = 32, channels: int = 3,
                 backend: str = "auto", on_bad_file: str = "skip"):
        check_clip_options(num_frames, frame_stride, fps, channels, backend)
        self.num_frames, self.frame_stride, self.fps = num_frames, frame_stride, fps
        self.image_size, self.channels, self.backend = image_size, channels, backend
        self.random_start = split == "train"
        super().__init__(root, split, on_bad_file)

    def decode(self, source: BinaryIO) -> Tensor:
        """frames: [T, C, S, S]"""
        frames = read_clip(source, self.num_frames, self.frame_stride, self.fps, self.random_start, self.backend)
        return frames_to_tensor(frames, self.image_size, self.channels)
