"""Paths as they reach a decoder or a log: checked to be a non-empty regular file, printed whatever
bytes they hold."""

from __future__ import annotations

import os
import stat


def check_readable_file(path: str | os.PathLike) -> None:
    """Raise with a clear reason unless `path` is a non-empty regular file: a pipe or device would
    block a decoder forever, and a symlink loop or dangling link fails here (os.stat follows links)
    rather than deep inside it."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("not a regular file (a folder, pipe or device)")
    if info.st_size == 0:
        raise ValueError("empty file (0 bytes)")


def printable_path(path: str | os.PathLike) -> str:
    """The path as text that any log or file can hold: undecodable bytes of non-UTF-8 names
    become \\xNN."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")
