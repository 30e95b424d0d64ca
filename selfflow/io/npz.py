"""Arrays of an .npz file read header first: the shape and dtype of a member are checked before
anything is allocated, and image arrays stream in blocks (50,000 ImageNet samples at 256x256 are
9.8 GB).

The bytes a header declares (count x pixels x channels, one product) must fit in what the member
really holds: its size in the zip directory, believed only as far as the bytes on disk (a stored
member) or deflate's largest ratio (a compressed one) allow; a block of rows read at once is bounded
by MAX_BLOCK_BYTES.

An .npz is a zip of .npy members; each member starts with a small header (format version, dtype,
shape), then the raw C-ordered data, which is read here row block by row block.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

import numpy as np

from selfflow.io.sizes import bounded_bytes

HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


@dataclass(frozen=True)
class ArrayHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool


MAX_DEFLATE_RATIO = 1032  # deflate never expands a stream more than about 1032 times
MAX_BLOCK_BYTES = 256 << 20  # rows read at once: a batch of large images streams in smaller blocks


def _read_header(member: IO[bytes], where: str) -> ArrayHeader:
    try:
        version = np.lib.format.read_magic(member)
        if version not in HEADER_READERS:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran_order, dtype = HEADER_READERS[version](member)
    except ValueError as error:
        raise ValueError(
            f"{where} has no readable .npy header ({error}); re-save it with numpy.savez"
        ) from None
    return ArrayHeader(tuple(int(n) for n in shape), np.dtype(dtype), bool(fortran_order))


@contextmanager
def _open_member(path: str | os.PathLike, key: str) -> Iterator[IO[bytes]]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{path} is not a readable .npz archive ({error})") from None
    with archive:
        if f"{key}.npy" not in archive.namelist():
            raise KeyError(f"{path} has no array {key!r}; it holds {sorted(npz_keys(path))}")
        with archive.open(f"{key}.npy") as member:
            yield member


def npz_keys(path: str | os.PathLike) -> set[str]:
    """The array names of an .npz archive (`arr_0`, `mu`, ...), read from its zip directory only."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")}
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{path} is not a readable .npz archive ({error})") from None


def member_capacity(path: str | os.PathLike, key: str) -> int:
    """The most bytes member `key` can hold once decompressed: its size in the zip directory,
    believed only as far as the archive's bytes on disk allow (1x for a stored member,
    MAX_DEFLATE_RATIO for a compressed one)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{key}.npy")
    on_disk = min(info.compress_size, os.path.getsize(path))
    ratio = 1 if info.compress_type == zipfile.ZIP_STORED else MAX_DEFLATE_RATIO
    return min(info.file_size, on_disk * ratio)


def npz_header(path: str | os.PathLike, key: str) -> ArrayHeader:
    """The member's header as declared; `iter_rows` checks it against what the member holds."""
    with _open_member(path, key) as member:
        return _read_header(member, f"{path}[{key}]")


def check_member_holds(path: str | os.PathLike, key: str, header: ArrayHeader, start: int) -> None:
    """The bytes `header` declares (shape x item size, one product) must fit in what the member
    holds from byte `start` on (`member_capacity`): a forged or truncated member is refused before
    its data is read."""
    what = f"{path}[{key}] (truncated or forged)"
    bounded_bytes(header.shape, header.dtype.itemsize, member_capacity(path, key) - start, what)


def read_small_array(path: str | os.PathLike, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """One member whose shape must be `shape` (a statistic such as mu [2048] or sigma [2048, 2048])
    as float64; any other shape or a non-float dtype is refused before its data is read."""
    header = npz_header(path, key)
    if header.shape != shape or header.dtype.kind != "f":
        raise ValueError(
            f"{path}[{key}] is {header.dtype} {list(header.shape)}; the ADM layout "
            f"needs float {list(shape)}"
        )
    with _open_member(path, key) as member:
        return np.lib.format.read_array(member, allow_pickle=False).astype(np.float64)


def iter_rows(
    path: str | os.PathLike, key: str, batch_size: int, header: ArrayHeader
) -> Iterator[np.ndarray]:
    """The member `key` in blocks of up to `batch_size` rows (fewer where they would exceed
    MAX_BLOCK_BYTES): [b, *header.shape[1:]] each, C order.

    `header` is the member's header as the caller checked it (shape bounds, dtype) before any block
    is allocated.
    """
    if header.fortran_order or header.dtype.hasobject:
        raise ValueError(
            f"{path}[{key}] is stored in Fortran order or as Python objects; save it as a plain "
            f"C-ordered array with numpy.savez"
        )
    row_bytes = int(np.prod(header.shape[1:], dtype=np.int64)) * header.dtype.itemsize
    block = max(1, min(batch_size, MAX_BLOCK_BYTES // max(row_bytes, 1)))
    with _open_member(path, key) as member:
        _read_header(member, f"{path}[{key}]")
        check_member_holds(path, key, header, member.tell())
        for start in range(0, header.shape[0], block):
            rows = min(block, header.shape[0] - start)
            data = member.read(rows * row_bytes)
            if len(data) != rows * row_bytes:
                raise ValueError(
                    f"{path}[{key}] is truncated: its header promises {header.shape[0]} rows, the "
                    f"data ends after {start + len(data) // max(row_bytes, 1)}"
                )
            yield np.frombuffer(data, dtype=header.dtype).reshape(rows, *header.shape[1:])
