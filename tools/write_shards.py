#!/usr/bin/env python
"""Write a folder of labelled image, audio or video files as WebDataset tar shards, one set per split.

    python tools/write_shards.py /path/to/images /path/to/shards --modality image
    selfflow-train experiment=digits data=image_shards data.root=/path/to/shards

The files of each split are the ones the folder dataset reads with the same options (class sub-folders, train/ and
test/ folders or a fixed `--test-fraction`, a CSV `--manifest`, or `--name-pattern`), in the same order. Sample k of
a split becomes `<split>-NNNNNN.tar` members `k.<ext>` (the file's bytes, unchanged), `k.cls` (its class index) and
`k.txt` (the caption file next to it, when there is one); `classes.json` names the classes. Each shard is written
to a temporary file and renamed when complete; existing shards are kept unless `--overwrite`. The last line printed
is a JSON summary.

Shards are made to be shared, so only what the source folder holds goes in: a file (or caption) whose real path,
links resolved, lies outside it (a symlink, a manifest path with `..` or an absolute one) is skipped, and so is any
file that does not decode, once, through the datasets' own decode functions at their default limits (`--max-pixels`,
`--max-member-bytes` raise them). Skipped files are listed in the summary with the reason.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

from selfflow.data.audio_io import AUDIO_EXTENSIONS, read_audio
from selfflow.data.bad_files import failure_reason, one_line
from selfflow.data.captions import CAPTION_FILE_SUFFIX
from selfflow.data.files import check_readable_file, find_labelled_files, printable_path
from selfflow.data.image_folder import IMAGE_EXTENSIONS, MAX_PIXELS, load_image
from selfflow.data.shards import (CAPTION_EXTENSION, CLASSES_FILE, LABEL_EXTENSION, MAX_CAPTION_BYTES,
                                  MAX_MEMBER_BYTES, TAR_BLOCK)
from selfflow.data.video_io import MAX_FRAME_PIXELS, VIDEO_EXTENSIONS, frames_to_tensor, read_clip

log = logging.getLogger("selfflow.data")

MODALITY_EXTENSIONS = {"image": IMAGE_EXTENSIONS, "audio": AUDIO_EXTENSIONS, "video": VIDEO_EXTENSIONS}
DEFAULT_MAX_PIXELS = {"image": MAX_PIXELS, "audio": None, "video": MAX_FRAME_PIXELS}  # an image or a video frame
BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
PROBE_SIZE = 8  # the check decode: an image or the middle video frame at 8x8, one second of audio at 8 kHz
PROBE_RATE = 8000


def parse_bytes(text: str) -> int:
    """`500M`, `1G`, `1.5G` or a plain number of bytes."""
    text = str(text).strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1] if text and text[-1] in BYTE_UNITS else ""
    try:
        value = float(text[:-1] if unit else text) * BYTE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 500M or 1G") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return int(value)


def tar_bytes(size: int) -> int:
    """Bytes a member of `size` bytes takes in a tar: its header block and its data padded to whole blocks."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")  # hidden: no <split>-*.tar pattern matches it


def _write_atomically(path: Path, data: bytes) -> None:
    """Write a temporary file next to `path`, then rename it to `path` (never a partial file)."""
    temporary = _temporary(path)
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class ShardWriter:
    """Samples into `<folder>/<split>-NNNNNN.tar`: a new shard after `max_samples` samples, or before a sample that
    would take the shard past `max_bytes` (a larger sample gets a shard of its own). Members stream into a temporary
    file that is renamed when its shard is complete; `abort` removes it."""

    def __init__(self, folder: Path, split: str, max_samples: int, max_bytes: int):
        if max_samples < 1:
            raise ValueError(f"--max-samples-per-shard={max_samples} must be >= 1")
        self.folder, self.split, self.max_samples, self.max_bytes = folder, split, max_samples, max_bytes
        self.written: list[Path] = []
        self.total_bytes = 0
        self._file = self._tar = None
        self._bytes = self._samples = 0

    def _path(self) -> Path:
        return self.folder / f"{self.split}-{len(self.written):06d}.tar"

    def add(self, key: str, members: dict[str, bytes]) -> None:
        size = sum(tar_bytes(len(data)) for data in members.values())
        if self._samples and (self._samples >= self.max_samples or self._bytes + size > self.max_bytes):
            self._finish_shard()
        if self._tar is None:
            self._file = open(_temporary(self._path()), "wb")
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        for extension, data in members.items():
            info = tarfile.TarInfo(f"{key}.{extension}")  # mtime 0, no owner: the same files give the same shard
            info.size, info.mode = len(data), 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._bytes += size
        self._samples += 1

    def _finish_shard(self) -> None:
        path = self._path()
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(_temporary(path), path)
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
            _temporary(self._path()).unlink(missing_ok=True)
            self._file = self._tar = None


def check_decoder(modality: str, max_pixels: int | None = None) -> Callable[[bytes], None]:
    """A function that decodes a file's bytes once through the dataset's own decode function (raising where the
    dataset would skip the file): the whole image, the middle video frame, a second of audio from the middle."""
    max_pixels = DEFAULT_MAX_PIXELS[modality] if max_pixels is None else max_pixels
    if modality == "image":
        return lambda data: load_image(io.BytesIO(data), PROBE_SIZE, 3, max_pixels)
    if modality == "audio":
        return lambda data: read_audio(io.BytesIO(data), PROBE_RATE, PROBE_RATE, min_peak=0.0)
    return lambda data: frames_to_tensor(read_clip(io.BytesIO(data), 1, max_frame_pixels=max_pixels,
                                                   max_clip_pixels=max_pixels), PROBE_SIZE, 3)


def read_inside(path: Path, root: Path, max_bytes: int) -> bytes:
    """The bytes of `path`, refused unless its real path (every link resolved) lies inside the resolved `root`,
    it is a non-empty regular file (a pipe would block the read forever) and it holds at most `max_bytes`."""
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(root):
        raise ValueError(f"its real path lies outside the source folder {printable_path(root)} (a link or a path "
                         f"with '..'); shards hold only the folder's own files: copy the file in to write it")
    check_readable_file(real)
    if real.stat().st_size > max_bytes:
        raise ValueError(f"it holds {real.stat().st_size} bytes, more than --max-member-bytes={max_bytes}")
    return real.read_bytes()


def _sample_members(path: Path, label: int, root: Path, decodes: Callable[[bytes], None],
                    max_member_bytes: int) -> dict[str, bytes]:
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


def write_shards(source: str | os.PathLike, out: str | os.PathLike, modality: str,
                 splits: tuple[str, ...] = ("train", "test"), test_fraction: float = 0.1, seed: int = 0,
                 manifest: str | None = None, name_pattern: str | None = None, label_field: str | None = None,
                 max_samples_per_shard: int = 10_000, max_shard_bytes: int = 1 << 30, overwrite: bool = False,
                 progress: bool = False, max_pixels: int | None = None,
                 max_member_bytes: int = MAX_MEMBER_BYTES) -> dict:
    """Write the shards of each split and classes.json; returns the summary (samples, shards, bytes, skipped:
    [{"path", "reason"}, ...])."""
    if modality not in MODALITY_EXTENSIONS:
        raise ValueError(f"--modality={modality!r} is unknown; choose one of {list(MODALITY_EXTENSIONS)}")
    root = Path(os.path.realpath(Path(source).expanduser()))
    decodes = check_decoder(modality, max_pixels)
    out = Path(out).expanduser()
    listings = {split: find_labelled_files(source, split, MODALITY_EXTENSIONS[modality], test_fraction, seed,
                                           manifest, name_pattern, label_field) for split in splits}
    existing = sorted(p for split in splits for p in out.glob(f"{split}-*.tar"))
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds shards ({existing[0].name}, ... {len(existing)} files); pass "
                              f"--overwrite to replace them or choose another output folder")
    class_names = listings[splits[0]].class_names
    out.mkdir(parents=True, exist_ok=True)
    summary = {"source": str(source), "out": str(out), "modality": modality, "classes": len(class_names),
               "splits": {}}
    bar = _progress(progress)
    if bar is not None:
        bar.start()
    try:
        for split, files in listings.items():
            writer = ShardWriter(out, split, max_samples_per_shard, max_shard_bytes)
            task = bar.add_task(f"{split} shards", total=len(files.paths)) if bar is not None else None
            skipped, samples = [], 0
            try:
                for path, label in zip(files.paths, files.labels):
                    try:
                        members = _sample_members(path, label, root, decodes, max_member_bytes)
                    except Exception as error:  # noqa: BLE001 - unreadable or undecodable: the file is not written
                        skipped.append({"path": printable_path(path), "reason": failure_reason(error)})
                        log.warning("skipping %s: %s", one_line(printable_path(path)), one_line(failure_reason(error)))
                    else:
                        writer.add(f"{samples:06d}", members)
                        samples += 1
                    if bar is not None:
                        bar.advance(task)
                shards = writer.close()
            except BaseException:
                writer.abort()
                raise
            for stale in sorted(set(out.glob(f"{split}-*.tar")) - set(shards)):  # from an earlier, larger write
                stale.unlink()
            summary["splits"][split] = {"samples": samples, "shards": len(shards), "bytes": writer.total_bytes,
                                        "skipped": skipped}
    finally:
        if bar is not None:
            bar.stop()
    classes = {"modality": modality, "class_names": class_names,
               "splits": {split: {k: v for k, v in info.items() if k != "skipped"}
                          for split, info in summary["splits"].items()}}
    _write_atomically(out / CLASSES_FILE, json.dumps(classes, indent=2).encode() + b"\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="folder of labelled files (as data.root of the folder dataset)")
    parser.add_argument("out", help="folder for the shards and classes.json")
    parser.add_argument("--modality", required=True, choices=list(MODALITY_EXTENSIONS))
    parser.add_argument("--splits", nargs="+", default=["train", "test"], choices=["train", "test"])
    parser.add_argument("--test-fraction", type=float, default=0.1,
                        help="held out for test when the folder has no train/ and test/ (as the folder dataset)")
    parser.add_argument("--seed", type=int, default=0, help="seed of that fixed split (as the folder dataset)")
    parser.add_argument("--manifest", help="CSV of path,label[,split] relative to the source folder")
    parser.add_argument("--name-pattern", help="labels from file names, e.g. '{digit}_{speaker}_{index}'")
    parser.add_argument("--label-field", help="the field of --name-pattern that is the label")
    parser.add_argument("--max-samples-per-shard", type=int, default=10_000)
    parser.add_argument("--max-shard-bytes", type=parse_bytes, default=parse_bytes("1G"), help="e.g. 500M, 1G")
    parser.add_argument("--max-pixels", type=int, help="largest image or video frame written, in pixels (default: "
                        "the loaders' default, data.train.max_pixels / max_frame_pixels)")
    parser.add_argument("--max-member-bytes", type=parse_bytes, default=MAX_MEMBER_BYTES,
                        help="largest file written (default: the loaders' data.train.max_member_bytes), e.g. 1G")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards of these splits")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (shown on a terminal)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        summary = write_shards(args.source, args.out, args.modality, tuple(args.splits), args.test_fraction,
                               args.seed, args.manifest, args.name_pattern, args.label_field,
                               args.max_samples_per_shard, args.max_shard_bytes, args.overwrite,
                               progress=not args.no_progress and sys.stderr.isatty(), max_pixels=args.max_pixels,
                               max_member_bytes=args.max_member_bytes)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"write_shards.py: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
