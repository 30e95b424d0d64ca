"""WebDataset tar shards, on a disk or in any object store fsspec reaches, as map-style datasets of
images, audio clips or video clips.

A shard is an uncompressed tar whose members are grouped into samples by key, the member name up to
the first dot of its file name: `000123.jpg` (the data), `000123.cls` (the class index as text,
optional), `000123.txt` (a caption, optional). `classes.json` next to the shards names the classes.
`selfflow-shards write` writes this layout from a folder, with an index beside each shard
(`shard_index.py`). Where the samples lie comes from the index, or from a scan of the tar headers
(local shards without one); an item is then one read of its members, so the datasets have a length
and random access, and the exact-resume sampler and its per-rank split work unchanged: from an
object store too (`data.root=s3://bucket/prefix`, gs://, az://, https://, hf://,
`shard_sources.py`), one ranged read per sample. Decoding goes through the same functions as the
folder datasets: a shard item equals the folder item of its file.

Shards are data from others: every size, count and name read from them is bounded before memory is
allocated (`MAX_*` below and the `max_*` options), and a sample that breaks a rule (a link member, a
name too long, a key that appears twice, a member too large, a member whose tar header disagrees
with the index) is skipped and listed like an unreadable file, never a start-up stop.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from selfflow.data.folders.adm_crop import check_crop
from selfflow.data.folders.image_folder import check_image_options, load_image
from selfflow.data.folders.video_folder import check_clip_options
from selfflow.data.shards.index import (
    EXTENSION,
    INDEX_HINT,
    OFFSET,
    SAMPLE,
    SIZE,
    ShardTable,
    check_member_header,
    header_start,
    index_location,
    read_index,
    scan_shard,
    shortened,
)
from selfflow.data.shards.sources import (
    ByteSource,
    ObjectStore,
    ObjectStoreError,
    child,
    is_url,
    parent,
    source_for,
)
from selfflow.io.audio import AUDIO_EXTENSIONS, read_audio
from selfflow.io.bad_files import (
    BadFilePolicy,
    UnusableSample,
    failure_reason,
    require_one_readable,
)
from selfflow.io.images import IMAGE_EXTENSIONS, MAX_PIXELS
from selfflow.io.safe_files import resolve_inside
from selfflow.io.video import (
    MAX_CLIP_PIXELS,
    MAX_FRAME_PIXELS,
    VIDEO_EXTENSIONS,
    frames_to_tensor,
    read_clip,
)

log = logging.getLogger("selfflow.data")

CLASSES_FILE = "classes.json"
LABEL_EXTENSION = "cls"
CAPTION_EXTENSION = "txt"
# img2dataset/video2dataset metadata: the label where there is no .cls member, from the first of
# these fields that it has
JSON_EXTENSION = "json"
JSON_LABEL_FIELDS = ("cls", "label")
MAX_JSON_BYTES = 64 << 10  # a .json member read for its label
WRITE_HINT = (
    "write shards from a folder with: selfflow-shards write SOURCE_FOLDER SHARD_FOLDER --modality M"
)
MAX_LABEL_BYTES = 32  # a .cls member: one class index as text
MAX_CAPTION_BYTES = 64 << 10  # a .txt member
MAX_CLASSES_FILE_BYTES = 8 << 20  # classes.json: 100k class names of 80 characters
MAX_CLASS_NAME_CHARS = 256  # a class name becomes part of sample file names
MAX_CLASSES = (
    100_000  # the default of data.dataset.max_classes: the model gets one label embedding per class
)
MAX_MEMBER_BYTES = (
    256 << 20
)  # the default of data.dataset.max_member_bytes: a data member is read whole, per worker
COALESCE_BYTES = (
    64 << 10
)  # members of a sample this close together come in one read (one GET from a store)
SLOW_SCAN_SECONDS = 10.0  # a header scan this long suggests writing indexes
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """`train-{000000..000002}.tar` -> train-000000.tar, train-000001.tar, train-000002.tar;
    `{a,b}` alternatives; several groups expand as a product. Numbers keep the width of the range's
    first bound."""
    match = _BRACE.search(pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise ValueError(
                f"shard pattern {pattern!r} has an unbalanced brace; write e.g. "
                f"'dir/train-{{000000..000009}}.tar'"
            )
        return [pattern]
    body, head, tail = match[1], pattern[: match.start()], pattern[match.end() :]
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
        raise ValueError(
            f"shard pattern {pattern!r}: {{{body}}} is neither a range "
            f"{{000000..000009}} nor a list {{a,b}}"
        )
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def _split_files(source: ByteSource, folder, split: str) -> list:
    for name in (split, "val") if split == "test" else (split,):
        found = source.glob(folder, f"{name}-*.tar")
        if found:
            return found
    others = source.glob(folder, "*.tar")
    if others:
        raise FileNotFoundError(
            f"{folder} holds shards ({others[0]}, ...) but none named {split}-*.tar for "
            f"split={split!r}; name them <split>-NNNNNN.tar or give data.root as a list or a "
            f"pattern like 'dir/{{split}}-{{000000..000009}}.tar' ({{split}}: each split's name)"
        )
    raise FileNotFoundError(f"no {split}-*.tar shards in {folder}; {WRITE_HINT}")


def _root_names(root: str | os.PathLike | Sequence, split: str) -> list[str]:
    items = [root] if isinstance(root, (str, os.PathLike)) else list(root)
    if not items:
        raise ValueError(f"data.root is an empty list of shards; {WRITE_HINT}")
    return [
        name for item in items for name in expand_braces(os.fspath(item).replace("{split}", split))
    ]


def _members_inside(folder: Path, shards: list[Path]) -> list[Path]:
    """`shards` of a local folder, each with its index and the folder's classes.json resolving
    inside the folder (`resolve_inside`): a member that is a link to a file elsewhere is refused,
    never read as data."""
    for name in [CLASSES_FILE] + [n for s in shards for n in (s.name, index_location(s).name)]:
        if os.path.lexists(folder / name):
            resolve_inside(folder, name)
    return shards


def resolve_shards(
    root: str | os.PathLike | Sequence, split: str, store: ObjectStore | None = None
) -> list:
    """The shard files of one split: `root` is a folder (its `<split>-*.tar`, `val-*.tar` for test
    when there is no `test-*.tar`), a tar file, a brace pattern, or a list of those. `{split}` in a
    path is the split's name. Local shards come as Paths; shards in an object store as URLs
    (`s3://bucket/...`) (a URL not ending in .tar is a folder)."""
    names = _root_names(root, split)
    source = source_for(names, store)
    shards: list = []
    for name in names:
        if is_url(name):
            shards += (
                [name] if name.endswith(".tar") else _split_files(source, name.rstrip("/"), split)
            )
            continue
        path = Path(name).expanduser()
        if path.is_dir():
            shards += _members_inside(path, _split_files(source, path, split))
        elif path.is_file():
            shards.append(path)
        else:
            raise FileNotFoundError(
                f"shard {path} does not exist (data.root={name!r}); {WRITE_HINT}"
            )
    return shards


def read_class_names(
    source: ByteSource, folder, modality: str, max_classes: int = MAX_CLASSES
) -> list[str] | None:
    """The class names in `folder/classes.json` ({"class_names": [...], "modality": ...}), None
    without the file; a file too large, of another shape or naming more than `max_classes` classes
    is refused before it is used."""
    path = child(folder, CLASSES_FILE)
    try:
        text = source.read(path, 0, MAX_CLASSES_FILE_BYTES + 1)
    except (FileNotFoundError, IsADirectoryError):
        return None
    example = 'it must be JSON like {"class_names": ["cat", "dog"], "modality": "image"}'
    if len(text) > MAX_CLASSES_FILE_BYTES:
        raise ValueError(
            f"{path} is larger than {MAX_CLASSES_FILE_BYTES} bytes, far more than a "
            f"class list needs; {example}"
        )
    try:
        info = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as error:
        raise ValueError(
            f"{path} is not JSON ({type(error).__name__}: {str(error)[:120]}); {example}"
        ) from None
    names = info.get("class_names") if isinstance(info, dict) else None
    if not isinstance(names, list) or not all(
        isinstance(n, (str, int)) and not isinstance(n, bool) for n in names
    ):
        raise ValueError(
            f'{path} is not a class list ("class_names" must be a list of names); {example}'
        )
    if len(names) > max_classes:
        raise ValueError(
            f"{path} names {len(names)} classes, more than data.dataset.max_classes={max_classes}; "
            f"raise it if the shards really hold that many classes"
        )
    names = [str(name) for name in names]
    longest = max(names, key=len, default="")
    if len(longest) > MAX_CLASS_NAME_CHARS:
        raise ValueError(
            f"{path} holds a class name of {len(longest)} characters, more than "
            f"{MAX_CLASS_NAME_CHARS}; shorten it"
        )
    written_for = info.get("modality")
    if written_for not in (None, modality):
        shown = shortened(str(written_for), 20)
        raise ValueError(
            f"the shards next to {path} hold {shown} samples, not "
            f"{modality}; use data={shown}_shards"
        )
    return names


class PackedStrings:
    """Many strings in two numpy arrays (UTF-8 bytes and offsets): DataLoader workers share the
    pages instead of copying them on every read (no reference counts), and a long string costs its
    own length only (a fixed-width array would give every entry the width of the longest)."""

    def __init__(self, strings: list[str]):
        encoded = [text.encode("utf-8", "surrogateescape") for text in strings]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)  # [N + 1]
        np.cumsum([len(data) for data in encoded], out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)  # [total bytes]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return (
            self.data[self.offsets[i] : self.offsets[i + 1]]
            .tobytes()
            .decode("utf-8", "surrogateescape")
        )


def member_columns(table: ShardTable, extensions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per sample of `table`, which of `extensions` it has first (in tar order) and that member's
    (offset, size, first header offset): choice: [S] index into `extensions`, -1 for none; members:
    [S, 3], size -1 for none."""
    rank = np.array(
        [extensions.index(e) if e in extensions else -1 for e in table.extensions] + [-1]
    )  # [E + 1]
    chosen = rank[table.members[:, EXTENSION]] >= 0  # [M]: members of one of `extensions`
    rows = np.hstack([table.members, table.headers[:, None]])[chosen]  # [R, 5]: row, first header
    first = np.unique(rows[:, SAMPLE], return_index=True)[
        1
    ]  # first row of each sample that has one
    choice = np.full(len(table.keys), -1, dtype=np.int64)
    members = np.tile(np.array([0, -1, 0], dtype=np.int64), (len(table.keys), 1))
    choice[rows[first, SAMPLE]] = rank[rows[first, EXTENSION]]
    members[rows[first, SAMPLE]] = rows[first][:, [OFFSET, SIZE, 4]]
    return choice, members


class ShardDataset(Dataset):
    """Items `(decode(data member), label)` from tar shards; an item whose member cannot be read or
    decoded is None (see `collate_samples`) or, with on_bad_file=error, stops the run. Subclasses
    set `modality`, `extensions` and `decode`.

    max_member_bytes: a data member is read whole into memory, so larger ones are skipped;
    max_classes: more classes in classes.json stop the start-up, a larger class index makes its
    sample bad. store: where URL roots are read from (`ObjectStore`: endpoint, region, deadline,
    ...); None reads them with the store's own settings.
    """

    modality = ""
    extensions: tuple[str, ...] = ()

    def __init__(
        self,
        root: str | os.PathLike | Sequence,
        split: str = "train",
        on_bad_file: str = "skip",
        max_member_bytes: int = MAX_MEMBER_BYTES,
        max_classes: int = MAX_CLASSES,
        store: ObjectStore | None = None,
    ):
        if max_member_bytes < 1 or max_classes < 1:
            raise ValueError(
                f"data.dataset.max_member_bytes={max_member_bytes} and "
                f"max_classes={max_classes} must be positive"
            )
        self.bad_files = BadFilePolicy(on_bad_file)
        self.split, self.max_member_bytes, self.max_classes = split, max_member_bytes, max_classes
        self.shards = resolve_shards(root, split, store)
        self.source = source_for(self.shards, store)
        # before the tables: names a wrong modality
        names = read_class_names(self.source, parent(self.shards[0]), self.modality, max_classes)
        if names is None and is_url(self.shards[0]):
            raise FileNotFoundError(
                f"no {CLASSES_FILE} next to {self.shards[0]}: shards in an object store need "
                f"it (selfflow-shards write writes it; upload it with the shards)"
            )
        self.data_extensions = tuple(e.lstrip(".") for e in self.extensions)
        started = time.perf_counter()
        tables = self.source.map(self._table, self.shards)
        self._suggest_indexes(time.perf_counter() - started)
        self._member_columns(tables)
        self.class_names = names if names is not None else self._class_names_from_labels()
        self.check_readable()

    def _member_columns(self, tables: list[ShardTable]) -> None:
        """The members of every sample of every shard as flat arrays: keys, data, label and
        caption members (each row: shard, offset, size, first header), and the samples that cannot
        be used."""
        keys, data_ext, data, labels, label_json, captions = [], [], [], [], [], []
        self.problems: dict[int, str] = {}  # sample index -> why it cannot be used (see ShardTable)
        for shard_index, (shard, table) in enumerate(zip(self.shards, tables)):
            choice, data_members = member_columns(table, self.data_extensions)
            self._check_data_members(shard, table, choice)
            self.problems.update(
                {len(keys) + sample: reason for sample, reason in table.problems.items()}
            )
            column = np.full((len(table.keys), 1), shard_index, dtype=np.int64)
            keys += table.keys
            data_ext.append(choice)
            data.append(np.hstack([column, data_members]))
            by_cls = member_columns(table, (LABEL_EXTENSION,))[1]  # [S, 3]
            by_json = member_columns(table, (JSON_EXTENSION,))[1]  # [S, 3]
            use_json = (by_cls[:, 1] < 0) & (by_json[:, 1] >= 0)  # [S]: .cls wins over .json
            labels.append(np.hstack([column, np.where(use_json[:, None], by_json, by_cls)]))
            label_json.append(use_json)
            captions.append(np.hstack([column, member_columns(table, (CAPTION_EXTENSION,))[1]]))
        if not keys:
            raise ValueError(
                f"the {len(self.shards)} shards of split={self.split!r} ({self.shards[0]}, ...) "
                f"hold no samples; {WRITE_HINT}"
            )
        self.keys = PackedStrings(keys)  # [N]
        self.data_ext = np.concatenate(data_ext).astype(
            np.int8
        )  # [N] index into data_extensions; -1: none
        # [N, 4]: shard, offset, size, first header; size -1: no data
        self.data_members = np.concatenate(data)
        self.label_members = np.concatenate(labels)  # [N, 4]; size -1: no label
        self.label_in_json = np.concatenate(label_json)  # [N]: the label member is .json
        self.caption_members = np.concatenate(captions)  # [N, 4]; size -1: no caption

    def _check_data_members(self, shard, table: ShardTable, choice: np.ndarray) -> None:
        """A sample with no member of this modality (and no other problem) means the wrong
        data config."""
        missing = [int(s) for s in np.flatnonzero(choice < 0) if int(s) not in table.problems]
        if missing:
            sample = missing[0]
            held = sorted(
                table.extensions[e]
                for e in table.members[table.members[:, SAMPLE] == sample, EXTENSION]
            )
            raise ValueError(
                f"sample {table.keys[sample]} of shard {shard} has no {self.modality} member (it "
                f"holds {held}; expected one of {list(self.data_extensions)}); check "
                f"data=<modality>_shards or write the shards again"
            )

    def _table(self, shard) -> ShardTable:
        """The shard's table from its index; a local shard without one is scanned."""
        table = read_index(self.source, shard, self.source.size(shard))
        if table is not None:
            return table
        if is_url(shard):
            raise FileNotFoundError(
                f"{shard} has no index ({index_location(shard)}); shards in an object store "
                f"are read through their indexes: run selfflow-shards index FOLDER where the "
                f"shards were written and upload the .index.json files with them"
            )
        return scan_shard(shard)

    def _suggest_indexes(self, seconds: float) -> None:
        unindexed = [s for s in self.shards if not is_url(s) and not index_location(s).is_file()]
        if unindexed and seconds > SLOW_SCAN_SECONDS:
            log.warning(
                "reading the tar headers of %d shards took %.0f s; `selfflow-shards index %s` "
                "writes an index beside each shard, read instead at every start",
                len(unindexed),
                seconds,
                unindexed[0].parent,
            )

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

    def _read(self, i: int, wanted: list[tuple[np.ndarray, int, str, str]]) -> list[bytes]:
        """The bytes of members of sample `i`, each given as (member [4], limit, what, extension):
        refused when larger than `limit` (a member is read whole), checked against its own tar
        headers (its full name too), all in one read when they lie close together (one request to an
        object store)."""
        spans, headers = [], []
        for member, limit, what, _ in wanted:
            shard, offset, size, header = (int(v) for v in member)
            if size > limit:
                raise UnusableSample(f"its {what} member has {size} bytes, more than {limit}")
            header = header_start(header, offset)
            spans.append((header, offset + size))  # the member's header blocks and its data
            headers.append(offset - header)
        location = self.shards[shard]
        start, end = min(s for s, _ in spans), max(e for _, e in spans)
        if end - start <= sum(e - s for s, e in spans) + COALESCE_BYTES:
            block = self.source.read(location, start, end - start)
            pieces = [block[s - start : e - start] for s, e in spans]
        else:
            pieces = [self.source.read(location, s, e - s) for s, e in spans]
        for piece, (s, e), length, (_, _, what, extension) in zip(pieces, spans, headers, wanted):
            if len(piece) != e - s:
                raise UnusableSample(
                    f"shard {location} is shorter than at start-up (changed while in use?)"
                )
            problem = check_member_header(piece[:length], self.keys[i], extension, e - s - length)
            if problem is not None:
                raise UnusableSample(
                    f"its {what} member does not match the shard's index: {problem} (the shard "
                    f"changed after it was indexed or scanned?); {INDEX_HINT}"
                )
        return [piece[length:] for piece, length in zip(pieces, headers)]

    def _label_member(self, i: int) -> tuple[np.ndarray, int, str, str]:
        if self.label_in_json[i]:
            return self.label_members[i], MAX_JSON_BYTES, f".{JSON_EXTENSION}", JSON_EXTENSION
        return self.label_members[i], MAX_LABEL_BYTES, f".{LABEL_EXTENSION}", LABEL_EXTENSION

    def _json_label(self, data: bytes) -> str:
        """The class index in a .json member's first JSON_LABEL_FIELDS field, as text; "-1" without
        one."""
        try:
            document = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as error:
            kind = type(error).__name__
            raise UnusableSample(f"its .{JSON_EXTENSION} member is not JSON ({kind})") from None
        document = document if isinstance(document, dict) else {}
        fields = [document[f] for f in JSON_LABEL_FIELDS if f in document]
        if not fields:
            return "-1"  # metadata without a label (img2dataset's): an unlabelled sample
        if isinstance(fields[0], bool) or not isinstance(fields[0], (int, str)):
            shown = str(fields[0])[:40]
            raise UnusableSample(f"its .{JSON_EXTENSION} label {shown!r} is not a class index")
        return str(fields[0])

    def _parse_label(self, data: bytes, from_json: bool = False) -> int:
        if from_json:
            text = self._json_label(data)
        else:
            text = data.decode("utf-8", errors="replace").strip()
        if not re.fullmatch(r"-?\d+", text):
            extension = JSON_EXTENSION if from_json else LABEL_EXTENSION
            raise UnusableSample(f"its .{extension} member holds {text[:40]!r}, not a class index")
        label = int(text)
        if label >= self.max_classes:
            raise UnusableSample(
                f"class index {label} is not below data.dataset.max_classes={self.max_classes}; "
                f"raise it if the shards really hold that many classes"
            )
        if label < -1 or (self.class_names and label >= self.num_classes):
            raise UnusableSample(
                f"class index {label} is out of range for the {self.num_classes} "
                f"classes of {CLASSES_FILE}"
            )
        return label

    def label(self, i: int) -> int:
        """The `.cls` member (else the label field of the `.json` member) as an int; -1 without
        one."""
        if self.label_members[i, 2] < 0:
            return -1
        data = self._read(i, [self._label_member(i)])[0]
        return self._parse_label(data, bool(self.label_in_json[i]))

    def caption(self, i: int) -> str | None:
        """The `.txt` member, None without one."""
        if self.caption_members[i, 2] < 0:
            return None
        wanted = (
            self.caption_members[i],
            MAX_CAPTION_BYTES,
            f".{CAPTION_EXTENSION}",
            CAPTION_EXTENSION,
        )
        return self._read(i, [wanted])[0].decode("utf-8", errors="replace").strip()

    def fetch(self, i: int) -> list[bytes]:
        """The bytes of the data member and, when there is one, the label member, in one read."""
        if i in self.problems:
            raise UnusableSample(self.problems[i])
        wanted = [
            (
                self.data_members[i],
                self.max_member_bytes,
                "data",
                self.data_extensions[self.data_ext[i]],
            )
        ]
        if self.label_members[i, 2] >= 0:
            wanted.append(self._label_member(i))
        return self._read(i, wanted)

    def finish(self, i: int, fetched: list[bytes]) -> tuple[Tensor, int]:
        """`(decoded data, label)` from what `fetch(i)` returned."""
        data, *label = fetched
        decoded = self.decode(io.BytesIO(data))
        return decoded, self._parse_label(label[0], bool(self.label_in_json[i])) if label else -1

    def load(self, i: int) -> tuple[Tensor, int]:
        return self.finish(i, self.fetch(i))

    def _class_names_from_labels(self) -> list[str]:
        """Without classes.json: read the (tiny) label members once; the names are the indices as
        text (at most max_classes: a larger index makes its sample bad)."""
        self.class_names = []  # no range check against classes.json while reading
        top = -1
        for i in np.flatnonzero(self.label_members[:, 2] >= 0):
            try:
                top = max(top, self.label(int(i)))
            except Exception:
                continue
        if top < 0:
            return []
        log.warning(
            "no %s next to %s: the %d classes are named by index; "
            "selfflow-shards write writes the names",
            CLASSES_FILE,
            self.shards[0],
            top + 1,
        )
        return [str(i) for i in range(top + 1)]

    def check_readable(self) -> None:
        """Fail at start-up when no sample can be read."""
        require_one_readable(
            len(self),
            self.load,
            self.member_name,
            self.bad_files,
            f"samples of split={self.split!r}",
            "check data.root and data=<modality>_shards",
        )

    def _item(self, i: int, load: Callable[[], tuple[Tensor, int]]):
        """`load()`, or None (listed as a bad file) when it fails; an unreachable store stops the
        run instead (resume=auto continues exactly), never skips every sample."""
        try:
            return load()
        except ObjectStoreError:
            raise
        except Exception as error:
            self.bad_files.handle(self.member_name(i), failure_reason(error))
            return None

    def __getitem__(self, i: int):
        return self._item(i, lambda: self.load(i))

    def load_batch(self, indices: list[int]) -> list:
        """Items `indices` as `[self[i] for i in indices]` gives them (the same augmentation draws),
        with the reads in flight at once: from an object store, one GET per sample, concurrently
        (`SeededSamples` uses this)."""

        def fetch(i: int):
            try:
                return self.fetch(i)
            except Exception as error:
                return error

        fetched = self.source.map(fetch, indices)
        for result in fetched:
            if isinstance(result, ObjectStoreError):
                raise result

        def finish(i: int, result):
            if isinstance(result, Exception):
                raise result
            return self.finish(i, result)

        return [
            self._item(i, lambda i=i, result=result: finish(i, result))
            for i, result in zip(indices, fetched)
        ]


class ImageShards(ShardDataset):
    """Images from shards as [channels, S, S] in [0, 1], decoded exactly like `ImageFolder`."""

    modality = "image"
    extensions = IMAGE_EXTENSIONS

    def __init__(
        self,
        root: str | os.PathLike | Sequence,
        split: str = "train",
        image_size: int = 32,
        channels: int = 3,
        hflip: bool = False,
        on_bad_file: str = "skip",
        max_pixels: int = MAX_PIXELS,
        max_member_bytes: int = MAX_MEMBER_BYTES,
        max_classes: int = MAX_CLASSES,
        store: ObjectStore | None = None,
        crop: str = "center",
    ):
        check_image_options(channels, max_pixels)
        self.image_size, self.channels, self.max_pixels = image_size, channels, max_pixels
        self.crop = check_crop(crop)
        self.hflip = hflip and split == "train"
        super().__init__(root, split, on_bad_file, max_member_bytes, max_classes, store)

    def decode(self, source: BinaryIO) -> Tensor:
        """image: [C, S, S]"""
        return load_image(source, self.image_size, self.channels, self.max_pixels, self.crop)

    def finish(self, i: int, fetched: list[bytes]) -> tuple[Tensor, int]:
        image, label = super().finish(i, fetched)
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, label


class AudioShards(ShardDataset):
    """Recordings from shards as mono clips [1, S], decoded exactly like `AudioFolder`."""

    modality = "audio"
    extensions = AUDIO_EXTENSIONS

    def __init__(
        self,
        root: str | os.PathLike | Sequence,
        split: str = "train",
        sample_rate: int = 8000,
        duration: float = 1.0,
        resample: bool = True,
        min_peak: float = 1e-4,
        on_bad_file: str = "skip",
        max_member_bytes: int = MAX_MEMBER_BYTES,
        max_classes: int = MAX_CLASSES,
        store: ObjectStore | None = None,
    ):
        if sample_rate <= 0 or duration <= 0:
            raise ValueError(
                f"data.dataset.sample_rate={sample_rate} and duration={duration} must be positive"
            )
        self.sample_rate, self.num_samples = int(sample_rate), round(sample_rate * duration)
        self.resample, self.min_peak = resample, min_peak
        self.random_crop = split == "train"
        super().__init__(root, split, on_bad_file, max_member_bytes, max_classes, store)

    def decode(self, source: BinaryIO) -> Tensor:
        """wave: [1, S]"""
        return read_audio(
            source,
            self.sample_rate,
            self.num_samples,
            self.random_crop,
            self.resample,
            self.min_peak,
        )


class VideoShards(ShardDataset):
    """Videos from shards as clips [T, C, S, S] in [0, 1], decoded in memory exactly
    like `VideoFolder`."""

    modality = "video"
    extensions = VIDEO_EXTENSIONS

    def __init__(
        self,
        root: str | os.PathLike | Sequence,
        split: str = "train",
        num_frames: int = 8,
        frame_stride: int = 1,
        fps: float | None = None,
        image_size: int = 32,
        channels: int = 3,
        backend: str = "auto",
        on_bad_file: str = "skip",
        max_frame_pixels: int = MAX_FRAME_PIXELS,
        max_clip_pixels: int = MAX_CLIP_PIXELS,
        max_member_bytes: int = MAX_MEMBER_BYTES,
        max_classes: int = MAX_CLASSES,
        store: ObjectStore | None = None,
    ):
        check_clip_options(
            num_frames, frame_stride, fps, channels, backend, max_frame_pixels, max_clip_pixels
        )
        self.num_frames, self.frame_stride, self.fps = num_frames, frame_stride, fps
        self.image_size, self.channels, self.backend = image_size, channels, backend
        self.max_frame_pixels, self.max_clip_pixels = max_frame_pixels, max_clip_pixels
        self.random_start = split == "train"
        super().__init__(root, split, on_bad_file, max_member_bytes, max_classes, store)

    def decode(self, source: BinaryIO) -> Tensor:
        """frames: [T, C, S, S]"""
        frames = read_clip(
            source,
            self.num_frames,
            self.frame_stride,
            self.fps,
            self.random_start,
            self.backend,
            self.max_frame_pixels,
            self.max_clip_pixels,
        )
        return frames_to_tensor(frames, self.image_size, self.channels)
