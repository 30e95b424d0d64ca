"""Where each sample's members lie in a tar shard: scanned from the tar headers, or read from the
shard's index.

A shard's index is a small JSON file beside it, `<shard>.index.json` (`selfflow-shards write` writes
one per shard, `selfflow-shards index DIR` indexes existing shards): the sample keys and every
member's extension, data offset and size, as a scan of the headers finds them. A run reads one small
file per shard instead of every header of every shard on every rank, and over an object store the
index is what makes random access possible at all.

A stale index (its shard changed after it was written) is refused: the index records the shard's
size and the SHA-256 of its first and last 64 KiB, checked at start-up. That costs two small reads
per shard whatever its size (a full hash would read every byte on every rank at every start, more
than the header scan it replaces), is independent of modification times (copies and uploads keep it
valid) and catches any rewrite that changes the size, the first samples or the end of the archive. A
change in the middle that keeps all three is caught where it matters: each member read through the
index is checked against its own tar header (a regular file, of the indexed size, named for its
sample), so an index never hands out bytes of another member.

An index from a stranger is data too: its size is bounded before it is read, every offset and size
must lie inside the shard, on tar's 512-byte blocks, and every name within the scan's limits, or the
index is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from selfflow.data.shards.sources import ByteSource, LocalFiles
from selfflow.io.safe_files import write_bytes_atomically

TAR_BLOCK = 512
MAX_KEY_CHARS = (
    1024  # a sample key (a member's name up to its first dot): real keys are short ("000123")
)
INDEX_SUFFIX = ".index.json"
INDEX_FORMAT = "selfflow-shard-index"
INDEX_VERSION = 2  # 2: each member's first header offset ("headers"): its full name is checked
FINGERPRINT_BYTES = 64 << 10  # hashed at each end of a shard
MAX_INDEX_BYTES = (
    16 << 20
)  # ~500k members, 25x a shard of the writer's default 10,000 samples; ~100 MB parsed
MAX_REASON_CHARS = 1024
MAX_HEADER_BYTES = 64 << 10  # a member's tar headers: extended ones (a long name) and its own block
INDEX_HINT = "write it again with: selfflow-shards index FOLDER"

# member rows: [M, 4] = (sample, extension, data offset, size); size -1: the member is not file data
# (a link, ...)
SAMPLE, EXTENSION, OFFSET, SIZE = range(4)
# headers: [M] where each member's first tar header block starts: extended headers (a pax or GNU
# long name, the only place a long or non-ASCII name is whole) come before the member's own block,
# which holds it mangled


@dataclass(kw_only=True)
class ShardTable:
    """The samples of one shard in tar order, and where their members lie.

    keys: [S] sample keys; extensions: [E] the member extensions seen; members: [M, 4] rows (sample,
    extension, offset, size), one per (sample, extension); headers: [M] the offset of each member's
    first tar header; problems: sample -> why it cannot be used (read as a bad file). size,
    fingerprint: of the shard the table describes (`shard_fingerprint`)."""

    keys: list[str]
    extensions: list[str]
    members: np.ndarray
    headers: np.ndarray
    problems: dict[int, str] = field(default_factory=dict)
    size: int = 0
    fingerprint: str = ""


def index_location(shard):
    """`dir/train-000000.tar` -> `dir/train-000000.tar.index.json` (a Path stays a Path, a URL
    a string)."""
    return (
        shard.with_name(shard.name + INDEX_SUFFIX)
        if isinstance(shard, Path)
        else f"{shard}{INDEX_SUFFIX}"
    )


def shard_fingerprint(source: ByteSource, location, size: int) -> str:
    """SHA-256 of the shard's first and last FINGERPRINT_BYTES (overlapping in a small shard)."""
    length = min(size, FINGERPRINT_BYTES)
    digest = hashlib.sha256(source.read(location, 0, length))
    digest.update(source.read(location, size - length, length))
    return digest.hexdigest()


def sample_key(member_name: str) -> tuple[str, str]:
    """`dir/000123.seg.png` -> ("dir/000123", "seg.png"): the WebDataset key and extension of a
    tar member."""
    folder, _, base = member_name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def shortened(name: str, keep: int = 60) -> str:
    return name if len(name) <= keep else f"{name[:keep]}..."


class _ReadsWithinFile:
    """A shard file whose reads never ask for more than the bytes left in it: tarfile reads a
    long-name or pax header in one read of the size that header claims, and Python allocates that
    size before reading."""

    def __init__(self, file: BinaryIO, size: int):
        self.file, self.size = file, size

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.file.tell())
        return self.file.read(left if n is None or n < 0 else min(n, left))

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()


_MEMBER_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a device",
    tarfile.BLKTYPE: "a device",
    tarfile.FIFOTYPE: "a named pipe",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}
DUPLICATE_KEY = (
    "its key appears more than once in the shard (members are grouped by key), so which data goes "
    "with which label is unknown; write the shard again with one group of members per key"
)


class _MemberGroups:
    """Tar members grouped into samples by key as they are read (WebDataset's rule: consecutive
    members with one key are one sample), with each sample's problem."""

    def __init__(self, size: int):
        self.size = size
        self.keys: list[str] = []
        self.extensions: dict[str, int] = {}
        # (sample, extension) -> (offset, size, first header), in tar order
        self.rows: dict[tuple[int, int], tuple[int, int, int]] = {}
        self.problems: dict[int, str] = {}
        self.first_of_key: dict[str, int] = {}
        self.grouping = (
            True  # False after a sample of one over-long name: the next member starts a sample
        )

    def add(self, member: tarfile.TarInfo) -> None:
        regular = member.isfile() and not member.issparse()
        if regular and member.offset_data + member.size > self.size:
            raise tarfile.ReadError(
                f"member {shortened(member.name)} runs past the end of the file"
            )
        if len(member.name) > MAX_KEY_CHARS:
            self.keys.append(shortened(member.name))
            self.problems[len(self.keys) - 1] = (
                f"its member name has {len(member.name)} characters, more than "
                f"{MAX_KEY_CHARS}; name samples with short keys such as 000123"
            )
            self.grouping = False
            return
        key, extension = sample_key(member.name)
        if not self.grouping or not self.keys or self.keys[-1] != key:  # a new group of members
            self.keys.append(key)
            self.grouping = True
            if key in self.first_of_key:
                self.problems[self.first_of_key[key]] = self.problems[len(self.keys) - 1] = (
                    DUPLICATE_KEY
                )
            self.first_of_key.setdefault(key, len(self.keys) - 1)
        sample = len(self.keys) - 1
        column = self.extensions.setdefault(extension, len(self.extensions))
        if (sample, column) in self.rows:
            self.problems[sample] = DUPLICATE_KEY
        where = (member.offset_data, member.size, member.offset)
        self.rows[sample, column] = where if regular else (0, -1, 0)
        if not regular:
            kind = _MEMBER_KINDS.get(member.type, "no regular file")
            self.problems.setdefault(
                sample,
                f"its member {shortened(member.name)} is {kind}, not file data; "
                f"shards hold regular files only",
            )

    def table(self, path: Path) -> ShardTable:
        rows = self.rows
        members = np.asarray([(s, e, o, n) for (s, e), (o, n, _) in rows.items()], dtype=np.int64)
        members = members.reshape(-1, 4)  # [M, 4]
        headers = np.asarray([h for _, _, h in rows.values()], dtype=np.int64)
        fingerprint = shard_fingerprint(LocalFiles(), path, self.size)
        return ShardTable(
            keys=self.keys,
            extensions=list(self.extensions),
            members=members,
            headers=headers,
            problems=self.problems,
            size=self.size,
            fingerprint=fingerprint,
        )


def scan_shard(path: Path) -> ShardTable:
    """The samples of a local shard in tar order (WebDataset groups consecutive members by key);
    directories are passed over. A member that is not file data (a link, device, pipe), a name
    longer than MAX_KEY_CHARS, a key that appears twice (two groups, or one extension twice: which
    data goes with which label is unknown) make the sample's problem.

    A truncated or corrupt shard raises: besides tarfile's own checks, every member's data must lie
    inside the file and the archive must end with tar's zero block (tarfile stops silently at a
    broken header after the first)."""
    size = path.stat().st_size
    groups = _MemberGroups(size)
    try:
        with (
            open(path, "rb") as raw,
            tarfile.open(fileobj=_ReadsWithinFile(raw, size), mode="r:") as tar,
        ):
            while (member := tar.next()) is not None:
                # tarfile keeps every header it reads; nothing here looks one up again
                tar.members.clear()
                if not member.isdir():
                    groups.add(member)
            end = tar.offset
        with open(path, "rb") as f:
            f.seek(end)
            if f.read(TAR_BLOCK) != bytes(TAR_BLOCK):
                raise tarfile.ReadError(
                    f"no end-of-archive block at byte {end}: the file is truncated or "
                    f"a header there is corrupt"
                )
    except (tarfile.TarError, EOFError, ValueError, OverflowError, RecursionError) as error:
        raise ValueError(
            f"shard {path} is truncated or corrupt ({str(error)[:200]}); write it again "
            f"(selfflow-shards write --overwrite) or leave it out of data.root"
        ) from None
    return groups.table(path)


def write_atomically(path: Path, data: bytes) -> None:
    """`data` as `path`, written to a new temporary file and renamed: readers never see a partial
    file, and a link planted in a shared shard folder is replaced, never written through
    (`replace_atomically`)."""
    write_bytes_atomically(path, data, sync=True)


def index_document(table: ShardTable) -> dict:
    """The index file's content: JSON with the member rows as one flat list of integers (compact,
    quick to read)."""
    return {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "size": table.size,
        "sha256_first_last_64k": table.fingerprint,
        "keys": table.keys,
        "extensions": table.extensions,
        "members": table.members.reshape(-1).tolist(),
        "headers": table.headers.tolist(),
        "problems": [[sample, reason] for sample, reason in sorted(table.problems.items())],
    }


def write_index(shard: Path, table: ShardTable) -> Path:
    """Write `table` as the index beside the local `shard`; returns the index's path."""
    path = index_location(shard)
    write_atomically(
        path, json.dumps(index_document(table), separators=(",", ":")).encode() + b"\n"
    )
    return path


class StaleIndex(ValueError):
    """The index describes another version of its shard."""


def refresh_index(shard: Path) -> str | None:
    """Write a local shard's index unless a fresh one is beside it; returns why it was written
    ("missing", "stale", "unreadable"), None when the index was fresh."""
    try:
        if read_index(LocalFiles(), shard, shard.stat().st_size) is not None:
            return None
        reason = "missing"
    except StaleIndex:
        reason = "stale"
    except ValueError:
        reason = "unreadable"
    write_index(shard, scan_shard(shard))
    return reason


def read_index(source: ByteSource, shard, shard_size: int) -> ShardTable | None:
    """The table in `shard`'s index, None without one. An index of another version of the shard
    raises StaleIndex; one that is too large, malformed or points outside the shard
    raises ValueError: both name the fix."""
    location = index_location(shard)
    try:
        text = source.read(location, 0, MAX_INDEX_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(text) > MAX_INDEX_BYTES:
        raise ValueError(
            f"shard index {location} is larger than {MAX_INDEX_BYTES} bytes, far more than an "
            f"index needs; {INDEX_HINT}"
        )
    try:
        document = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as error:
        raise ValueError(
            f"shard index {location} is not JSON ({type(error).__name__}: "
            f"{str(error)[:120]}); {INDEX_HINT}"
        ) from None
    if (
        not isinstance(document, dict)
        or document.get("format") != INDEX_FORMAT
        or document.get("version") != INDEX_VERSION
    ):
        raise ValueError(
            f"{location} is not a version-{INDEX_VERSION} {INDEX_FORMAT} file; {INDEX_HINT}"
        )
    size, fingerprint = document.get("size"), document.get("sha256_first_last_64k")
    if size != shard_size or fingerprint != shard_fingerprint(source, shard, shard_size):
        raise StaleIndex(
            f"the index {location} describes another version of {shard} (its size or the hash of "
            f"its first and last 64 KiB differ: the shard changed after it "
            f"was indexed); {INDEX_HINT}"
        )
    try:
        return _checked_table(document, shard_size)
    except (TypeError, ValueError, OverflowError) as error:
        raise ValueError(
            f"shard index {location} is malformed ({str(error)[:200]}); {INDEX_HINT}"
        ) from None


def _strings(value, what: str, limit: int) -> list[str]:
    if not isinstance(value, list) or not all(
        isinstance(v, str) and len(v) <= limit for v in value
    ):
        raise ValueError(f"{what} must be a list of strings of at most {limit} characters")
    return value


def _checked_table(document: dict, shard_size: int) -> ShardTable:
    """The document's table, every value checked against the shard it describes."""
    keys = _strings(document.get("keys"), "keys", MAX_KEY_CHARS)
    extensions = _strings(document.get("extensions"), "extensions", MAX_KEY_CHARS)
    flat = document.get("members")
    if not isinstance(flat, list) or len(flat) % 4 or not all(type(v) is int for v in flat):
        raise ValueError("members must be a flat list of integers, four per member")
    most = shard_size // TAR_BLOCK  # every member takes at least its header block
    if len(keys) > most or len(flat) // 4 > most:
        raise ValueError(
            f"it lists more samples or members than a shard of {shard_size} bytes can hold"
        )
    members = np.asarray(flat, dtype=np.int64).reshape(-1, 4)  # [M, 4]
    samples, columns, offsets, sizes = members.T
    data = sizes >= 0
    if members.size and (
        samples.min() < 0
        or samples.max() >= len(keys)
        or columns.min() < 0
        or columns.max() >= len(extensions)
        or sizes.min() < -1
    ):
        raise ValueError(
            "a member names a sample or extension that does not exist, or has a negative size"
        )
    if (
        np.any(offsets[data] < TAR_BLOCK)
        or np.any(offsets[data] % TAR_BLOCK)
        or np.any(offsets[data] + sizes[data] > shard_size - TAR_BLOCK)
    ):
        raise ValueError("a member's data does not lie on tar blocks inside the shard")
    if len(np.unique(samples * max(len(extensions), 1) + columns)) != len(members):
        raise ValueError("a sample lists one extension twice")
    headers = _checked_headers(document.get("headers"), members)
    problems = document.get("problems")
    if not isinstance(problems, list) or not all(
        isinstance(p, list)
        and len(p) == 2
        and type(p[0]) is int
        and 0 <= p[0] < len(keys)
        and isinstance(p[1], str)
        and len(p[1]) <= MAX_REASON_CHARS
        for p in problems
    ):
        raise ValueError(
            f"problems must be a list of [sample, reason] pairs (reasons of at most "
            f"{MAX_REASON_CHARS} characters)"
        )
    problems = {p[0]: p[1] for p in problems}
    fingerprint = document["sha256_first_last_64k"]
    return ShardTable(
        keys=keys,
        extensions=extensions,
        members=members,
        headers=headers,
        problems=problems,
        size=shard_size,
        fingerprint=fingerprint,
    )


def _checked_headers(flat, members: np.ndarray) -> np.ndarray:
    """headers [M]: one per member, on tar blocks. Where one does not lie within MAX_HEADER_BYTES
    before its data, the member's own block alone is checked (`header_start`): a wrong offset only
    makes the check stricter."""
    if not isinstance(flat, list) or len(flat) != len(members):
        raise ValueError("headers must be a list of integers, one per member")
    if not all(type(v) is int for v in flat):
        raise ValueError("headers must be a list of integers, one per member")
    headers = np.asarray(flat, dtype=np.int64).reshape(-1)  # [M]
    if np.any(headers < 0) or np.any(headers % TAR_BLOCK):
        raise ValueError("a member's header offset is not on tar blocks")
    return headers


def header_start(header: int, offset: int) -> int:
    """Where to read a member's tar headers from: its first header's offset when that lies at most
    MAX_HEADER_BYTES before its data, else its own block right before the data."""
    return header if TAR_BLOCK <= offset - header <= MAX_HEADER_BYTES else offset - TAR_BLOCK


def _member_of_headers(chain: bytes) -> tarfile.TarInfo | None:
    """The member that the tar headers `chain` describe, as a tar reader sees it (extended headers
    applied), or None unless they parse and end exactly where its data begins."""
    try:
        with tarfile.open(fileobj=io.BytesIO(chain), mode="r:") as tar:
            info = tar.firstmember
    except (tarfile.TarError, EOFError, ValueError, OverflowError):
        return None
    return info if info is not None and info.offset_data == len(chain) else None


def check_member_header(chain: bytes, key: str, extension: str, size: int) -> str | None:
    """Why the tar headers `chain` (from a member's first header block up to its data: its own
    block, after any extended headers that hold a long or non-ASCII name) do not belong to member
    `key.extension` of `size` bytes, or None when they do. The full name is compared whatever its
    characters: a name the member's own block holds only mangled is read from the extended headers
    before it, as every tar reader does."""
    try:
        block = tarfile.TarInfo.frombuf(chain[-TAR_BLOCK:], "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return "no valid tar header precedes it"
    if not block.isfile() or block.issparse():
        return "its tar header is not a regular file's"
    info = block if len(chain) == TAR_BLOCK else _member_of_headers(chain)
    if info is None and sample_key(block.name) == (key, extension):
        return "its extended tar headers do not lead to its data"
    info = info or block
    if sample_key(info.name) != (key, extension):
        return f"its tar header names {shortened(info.name)!r}"
    if info.size != size or not info.isfile():
        return f"its tar header gives {info.size} bytes, not {size}"
    return None
