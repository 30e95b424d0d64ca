"""Write a folder of labelled image, audio or video files as WebDataset tar shards, one set per
split, each shard with its index (`shard_index.py`). `selfflow-shards write` is the command.

The files of each split are the ones the folder dataset reads with the same options (class
sub-folders, train/ and test/ folders or a fixed `test_fraction`, a CSV `manifest`, or a
`name_pattern`), in the same order. Sample k of a split becomes `<split>-NNNNNN.tar` members
`k.<ext>` (the file's bytes, unchanged), `k.cls` (its class index) and `k.txt` (the caption file
next to it, when there is one); `classes.json` names the classes. Each shard is written to a
temporary file and renamed when complete, then its index is written beside it; existing shards are
kept unless `overwrite`.

Shards are made to be shared, so only what the source folder holds goes in: a file (or caption)
whose real path, links resolved, lies outside it (a symlink, a manifest path with `..` or an
absolute one) is skipped, and so is any file that does not decode, once, through the datasets' own
decode functions at their default limits (`max_pixels`, `max_member_bytes` raise them). Skipped
files are listed in the summary with the reason.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

from selfflow.data.folders.captions import CAPTION_FILE_SUFFIX
from selfflow.data.folders.files import find_labelled_files
from selfflow.data.folders.image_folder import load_image
from selfflow.data.shards.dataset import (
    CAPTION_EXTENSION,
    CLASSES_FILE,
    LABEL_EXTENSION,
    MAX_CAPTION_BYTES,
    MAX_MEMBER_BYTES,
)
from selfflow.data.shards.index import (
    TAR_BLOCK,
    index_location,
    scan_shard,
    write_atomically,
    write_index,
)
from selfflow.io.audio import AUDIO_EXTENSIONS, read_audio
from selfflow.io.bad_files import failure_reason, one_line
from selfflow.io.images import IMAGE_EXTENSIONS, MAX_PIXELS
from selfflow.io.paths import check_readable_file, printable_path
from selfflow.io.safe_files import create_temporary, finish_temporary
from selfflow.io.video import MAX_FRAME_PIXELS, VIDEO_EXTENSIONS, frames_to_tensor, read_clip

log = logging.getLogger("selfflow.data")

MODALITY_EXTENSIONS = {
    "image": IMAGE_EXTENSIONS,
    "audio": AUDIO_EXTENSIONS,
    "video": VIDEO_EXTENSIONS,
}
DEFAULT_MAX_PIXELS = {
    "image": MAX_PIXELS,
    "audio": None,
    "video": MAX_FRAME_PIXELS,
}  # an image or a video frame
PROBE_SIZE = (
    8  # the check decode: an image or the middle video frame at 8x8, one second of audio at 8 kHz
)
PROBE_RATE = 8000


def tar_bytes(size: int) -> int:
    """Bytes a member of `size` bytes takes in a tar: its header block and its data padded to
    whole blocks."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


class ShardWriter:
    """Samples into `<folder>/<split>-NNNNNN.tar`: a new shard after `max_samples` samples, or
    before a sample that would take the shard past `max_bytes` (a larger sample gets a shard of its
    own). Members stream into a temporary file that is renamed when its shard is complete, and its
    index written beside it; `abort` removes it."""

    def __init__(self, folder: Path, split: str, max_samples: int, max_bytes: int):
        if max_samples < 1:
            raise ValueError(f"--max-samples-per-shard={max_samples} must be >= 1")
        self.folder, self.split, self.max_samples, self.max_bytes = (
            folder,
            split,
            max_samples,
            max_bytes,
        )
        self.written: list[Path] = []
        self.total_bytes = 0
        self._file = self._tar = None
        self._temporary: Path | None = None  # the shard being written, under a temporary name
        self._bytes = self._samples = 0

    def _path(self) -> Path:
        return self.folder / f"{self.split}-{len(self.written):06d}.tar"

    def add(self, key: str, members: dict[str, bytes]) -> None:
        size = sum(tar_bytes(len(data)) for data in members.values())
        if self._samples and (
            self._samples >= self.max_samples or self._bytes + size > self.max_bytes
        ):
            self._finish_shard()
        if self._tar is None:
            # both stay open until the shard is full (closed by _finish_shard)
            self._file, self._temporary = create_temporary(self._path())
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        for extension, data in members.items():
            info = tarfile.TarInfo(
                f"{key}.{extension}"
            )  # mtime 0, no owner: the same files give the same shard
            info.size, info.mode = len(data), 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._bytes += size
        self._samples += 1

    def _finish_shard(self) -> None:
        path = self._path()
        self._tar.close()
        self._file.flush()
        table = scan_shard(self._temporary)  # the index describes exactly the bytes written
        # a link planted under the shard's name is replaced, not followed
        finish_temporary(self._file, self._temporary, path, sync=True)
        self._temporary = None
        write_index(path, table)
        self.written.append(path)
        self.total_bytes += path.stat().st_size
        self._file = self._tar = None
        self._bytes = self._samples = 0

    def close(self) -> list[Path]:
        if self._tar is not None:
            self._finish_shard()
        return self.written

    def abort(self) -> None:
        """Drop the shard being written (after an error): no partial shard is left behind."""
        if self._file is not None:
            self._file.close()
            self._file = self._tar = None
        self._drop_temporary()

    def _drop_temporary(self) -> None:
        if self._temporary is not None:
            self._temporary.unlink(missing_ok=True)
            self._temporary = None


def check_decoder(modality: str, max_pixels: int | None = None) -> Callable[[bytes], None]:
    """A function that decodes a file's bytes once through the dataset's own decode function
    (raising where the dataset would skip the file): the whole image, the middle video frame, a
    second of audio from the middle."""
    max_pixels = DEFAULT_MAX_PIXELS[modality] if max_pixels is None else max_pixels
    if modality == "image":
        return lambda data: load_image(io.BytesIO(data), PROBE_SIZE, 3, max_pixels)
    if modality == "audio":
        return lambda data: read_audio(io.BytesIO(data), PROBE_RATE, PROBE_RATE, min_peak=0.0)
    return lambda data: frames_to_tensor(
        read_clip(io.BytesIO(data), 1, max_frame_pixels=max_pixels, max_clip_pixels=max_pixels),
        PROBE_SIZE,
        3,
    )


def read_inside(path: Path, root: Path, max_bytes: int) -> bytes:
    """The bytes of `path`, refused unless its real path (every link resolved) lies inside the
    resolved `root`, it is a non-empty regular file (a pipe would block the read forever) and it
    holds at most `max_bytes`."""
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(root):
        raise ValueError(
            f"its real path lies outside the source folder {printable_path(root)} (a link or a "
            f"path with '..'); shards hold only the folder's own files: "
            f"copy the file in to write it"
        )
    check_readable_file(real)
    if real.stat().st_size > max_bytes:
        raise ValueError(
            f"it holds {real.stat().st_size} bytes, more than --max-member-bytes={max_bytes}"
        )
    return real.read_bytes()


def _sample_members(
    path: Path, label: int, root: Path, decodes: Callable[[bytes], None], max_member_bytes: int
) -> dict[str, bytes]:
    data = read_inside(path, root, max_member_bytes)
    decodes(data)  # the bytes written are the bytes decoded: nothing undecodable is shipped
    members = {path.suffix.lower().lstrip("."): data}
    if label >= 0:
        members[LABEL_EXTENSION] = str(label).encode()
    caption = path.with_suffix(CAPTION_FILE_SUFFIX)
    if caption.is_file():
        try:
            members[CAPTION_EXTENSION] = read_inside(caption, root, MAX_CAPTION_BYTES)
        except ValueError as error:
            raise ValueError(f"its caption file {caption.name}: {error}") from None
    return members


def _progress(enabled: bool):
    if not enabled:
        return None
    try:
        from rich.progress import Progress
    except ImportError:
        return None
    return Progress(transient=True)


def _refuse_existing(out: Path, splits: tuple[str, ...], overwrite: bool) -> None:
    existing = sorted(p for split in splits for p in out.glob(f"{split}-*.tar"))
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds shards ({existing[0].name}, ... {len(existing)} files); pass "
            f"--overwrite to replace them or choose another output folder"
        )


def _write_split(out: Path, split: str, files, add_sample, writer: ShardWriter, bar) -> dict:
    """One split's files through `add_sample(path, label) -> members` into `writer`; its summary.
    Shards of an earlier, larger write of the split are removed."""
    task = bar.add_task(f"{split} shards", total=len(files.paths)) if bar is not None else None
    skipped, samples = [], 0
    try:
        for path, label in zip(files.paths, files.labels):
            try:
                members = add_sample(path, label)
            except Exception as error:
                skipped.append({"path": printable_path(path), "reason": failure_reason(error)})
                log.warning(
                    "skipping %s: %s",
                    one_line(printable_path(path)),
                    one_line(failure_reason(error)),
                )
            else:
                writer.add(f"{samples:06d}", members)
                samples += 1
            if bar is not None:
                bar.advance(task)
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    for stale in sorted(set(out.glob(f"{split}-*.tar")) - set(shards)):
        stale.unlink()
        index_location(stale).unlink(missing_ok=True)
    return {
        "samples": samples,
        "shards": len(shards),
        "bytes": writer.total_bytes,
        "skipped": skipped,
    }


def write_shards(
    source: str | os.PathLike,
    out: str | os.PathLike,
    modality: str,
    splits: tuple[str, ...] = ("train", "test"),
    test_fraction: float = 0.1,
    seed: int = 0,
    manifest: str | None = None,
    name_pattern: str | None = None,
    label_field: str | None = None,
    max_samples_per_shard: int = 10_000,
    max_shard_bytes: int = 1 << 30,
    overwrite: bool = False,
    progress: bool = False,
    max_pixels: int | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> dict:
    """Write the shards of each split and classes.json; returns the summary (samples, shards,
    bytes, skipped: [{"path", "reason"}, ...])."""
    if modality not in MODALITY_EXTENSIONS:
        raise ValueError(
            f"--modality={modality!r} is unknown; choose one of {list(MODALITY_EXTENSIONS)}"
        )
    root = Path(os.path.realpath(Path(source).expanduser()))
    decodes = check_decoder(modality, max_pixels)
    out = Path(out).expanduser()
    extensions = MODALITY_EXTENSIONS[modality]
    listings = {
        split: find_labelled_files(
            source, split, extensions, test_fraction, seed, manifest, name_pattern, label_field
        )
        for split in splits
    }
    _refuse_existing(out, splits, overwrite)
    class_names = listings[splits[0]].class_names
    out.mkdir(parents=True, exist_ok=True)
    summary = {"source": str(source), "out": str(out), "modality": modality}
    summary |= {"classes": len(class_names), "splits": {}}

    def add_sample(path, label):
        return _sample_members(path, label, root, decodes, max_member_bytes)

    bar = _progress(progress)
    if bar is not None:
        bar.start()
    try:
        for split, files in listings.items():
            writer = ShardWriter(out, split, max_samples_per_shard, max_shard_bytes)
            summary["splits"][split] = _write_split(out, split, files, add_sample, writer, bar)
    finally:
        if bar is not None:
            bar.stop()
    _write_classes(out, modality, class_names, summary["splits"])
    return summary


def _write_classes(out: Path, modality: str, class_names: list[str], splits: dict) -> None:
    """classes.json: the modality, the class names and each split's counts (skipped files aside)."""
    counts = {s: {k: v for k, v in info.items() if k != "skipped"} for s, info in splits.items()}
    classes = {"modality": modality, "class_names": class_names, "splits": counts}
    write_atomically(out / CLASSES_FILE, json.dumps(classes, indent=2).encode() + b"\n")
