"""Writing into folders that others may have shared, without following the links they planted there.

A folder someone else made (a run folder, a shard folder, a latent cache, a sampling job) may hold a
symbolic link under the very name selfflow is about to write (`.lock`, a temporary file,
`skipped_files.tsv`): opened the usual way, the write lands in the file the link points at. Every
write inside such a folder goes through one of these:

- `replace_atomically(path)`: the new content goes to a temporary file created exclusively beside
  `path` (a random name, O_CREAT | O_EXCL | O_NOFOLLOW: never an existing file or link) and written
  through the descriptor that created it (never reopened by name), then renamed over `path`. A
  rename replaces a link instead of following it, and readers never see half a file.
- `open_no_follow(path, flags)`: opens an existing or new file without following a link, and refuses
  anything but a regular file with one name (a link, a folder, a pipe, a hard link to another file):
  lock files and append-only records.
- `resolve_inside(folder, member)`: the read side: a member of a folder of shards, caches or chunks
  must resolve inside that folder, or it is refused with one line naming it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

TEMPORARY_SUFFIX = ".tmp"  # unfinished writes: `.<name>.<random>.tmp` beside the file
FILE_MODE = 0o644  # what a plain open() gives under the usual umask


class UnsafeFileError(OSError):
    """A file selfflow was to write or read is a link, not a regular file, or lies outside its
    folder."""


def create_temporary(path: Path) -> tuple[BinaryIO, Path]:
    """A new file beside `path` under a random name `.<name>.<random>.tmp`, created exclusively
    without following links (`tempfile.mkstemp`), open for writing.

    Args:
        path: the file the temporary one will become; its folder must exist.

    Returns:
        (the open binary file, its path).
    """
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    file = os.fdopen(fd, "w+b")
    file.raw.name = name  # what the file is called in messages (a descriptor's number otherwise)
    return file, Path(name)


def finish_temporary(file: BinaryIO, temporary: Path, path: Path, sync: bool = False) -> None:
    """Close `file` (the temporary one of `create_temporary`) and rename it over `path`."""
    file.flush()
    os.fchmod(file.fileno(), FILE_MODE)
    if sync:
        os.fsync(file.fileno())
    file.close()
    os.replace(temporary, path)
    if sync:
        sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename into it survives a power cut (a no-op where folders cannot
    be synced)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def replace_atomically(path: str | os.PathLike, sync: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary file for the new content of `path`; when the block ends without an error, it
    is renamed over `path` (a link planted under that name is replaced, never followed). On an error
    `path` is left as it was and the temporary file is removed.

    Args:
        path: the file to write; its folder must exist.
        sync: fsync the file before the rename and the folder after it (checkpoints, chunks of a
            job).

    Returns:
        A context manager giving the open binary file to write (seekable).
    """
    path = Path(path)
    file, temporary = create_temporary(path)
    try:
        yield file
        finish_temporary(file, temporary, path, sync)
    except BaseException:
        file.close()
        temporary.unlink(missing_ok=True)
        raise


def write_bytes_atomically(path: str | os.PathLike, data: bytes, sync: bool = False) -> Path:
    """Write `data` as `path` through `replace_atomically`; returns the path."""
    with replace_atomically(path, sync=sync) as f:
        f.write(data)
    return Path(path)


def non_finite_key(value: Any, prefix: str = "") -> str | None:
    """The dotted key of the first NaN or infinite float in nested dicts and lists, None if there is
    none."""
    if isinstance(value, float) and not math.isfinite(value):
        return prefix or "the value"
    items = ()
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    for key, item in items:
        found = non_finite_key(item, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def strict_json(value: Any, indent: int | None = 2) -> str:
    """JSON text of `value`; NaN and infinities are refused (they are no JSON: strict readers reject
    the file), with a ValueError naming the key."""
    key = non_finite_key(value)
    if key is not None:
        cause = "a metric computed from broken inputs?"
        raise ValueError(f"{key} is not a finite number; JSON cannot hold it ({cause})")
    return json.dumps(value, indent=indent, allow_nan=False)


def write_json_atomically(
    path: str | os.PathLike,
    value: Any,
    indent: int | None = 2,
    sync: bool = False,
) -> Path:
    """Write `value` as strict JSON (`strict_json`) to `path` through `replace_atomically`; returns
    the path."""
    return write_bytes_atomically(path, (strict_json(value, indent) + "\n").encode(), sync=sync)


def open_no_follow(path: str | os.PathLike, flags: int, mode: int = FILE_MODE) -> int:
    """os.open(path, flags) that never follows a link at `path` and accepts only a regular file with
    one name.

    Args:
        path: the file (created when flags has os.O_CREAT).
        flags: os.O_* flags; O_NOFOLLOW and O_CLOEXEC are added.
        mode: permissions of a new file.

    Returns:
        The open file descriptor (the caller closes it).
    """
    try:
        no_follow = os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(path, flags | no_follow, mode)
    except OSError as error:
        if os.path.islink(path):
            raise UnsafeFileError(
                f"{path} is a symbolic link; selfflow writes no file through a link in a folder "
                f"it may not have "
                f"made. Remove the link (or choose another folder)"
            ) from error
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "no regular file"
        if stat.S_ISREG(info.st_mode):
            what = "a file with another name too (a hard link)"
        raise UnsafeFileError(f"{path} is {what}; remove it (or choose another folder)")
    os.set_blocking(fd, True)
    return fd


def resolve_inside(folder: str | os.PathLike, member: str | os.PathLike) -> Path:
    """`member` (a name in `folder`, or a path) resolved with every link followed, refused unless it
    lies inside `folder` (also resolved): a shard, cache record or chunk that is a link to a file
    elsewhere is no member.

    Args:
        folder: the folder the user pointed at.
        member: a file in it.

    Returns:
        The resolved path of the member.
    """
    root = Path(os.path.realpath(folder))
    resolved = Path(os.path.realpath(Path(folder) / member))
    if resolved != root and root not in resolved.parents:
        raise UnsafeFileError(
            f"{Path(folder) / member} resolves to {resolved}, outside {root}; the members of a "
            f"folder of shards, caches or chunks must lie inside it (copy the file in, or point at "
            f"the folder that holds it)"
        )
    return resolved
