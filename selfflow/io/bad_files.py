"""What a dataset does with a file it cannot read: skip it with one warning line and a record,
or stop."""

from __future__ import annotations

import csv
import fcntl
import io
import logging
import os
import re
from pathlib import Path

from selfflow.io.paths import printable_path
from selfflow.io.safe_files import open_no_follow

log = logging.getLogger("selfflow.data")

BAD_FILE_POLICIES = ("skip", "error")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BadFileError(RuntimeError):
    """A sample file could not be read and data.on_bad_file=error."""


class UnusableSample(Exception):
    """A file that decodes but cannot be used as a sample (too short, silent, wrong rate); the
    message says why."""


def failure_reason(error: Exception) -> str:
    """The reason given for a skipped file: the message of an UnusableSample, else the error's type
    and message."""
    return str(error) if isinstance(error, UnusableSample) else f"{type(error).__name__}: {error}"


def one_line(text: str) -> str:
    """`text` with its control characters written as escapes (a tab as \\t): a log line stays
    one line."""
    return _CONTROL.sub(lambda match: repr(match[0])[1:-1], text)


def record_row(path: str, reason: str) -> str:
    """One row of a skipped-files TSV: fields holding a tab, a newline or a quote are quoted (csv's
    excel-tab dialect), so `csv.reader(f, dialect="excel-tab")` reads back exactly the rows that
    were written."""
    row = io.StringIO()
    csv.writer(row, dialect="excel-tab", lineterminator="\n").writerow([path, reason])
    return row.getvalue()


class BadFilePolicy:
    """Shared by a dataset's samples. `record_path`, when set, gets one `path<TAB>reason` row per
    skipped file (`record_row`: a tab or newline in a file name cannot forge a row)."""

    def __init__(self, on_bad_file: str = "skip", record_path: str | os.PathLike | None = None):
        if on_bad_file not in BAD_FILE_POLICIES:
            raise ValueError(
                f"data.on_bad_file={on_bad_file!r} is unknown; choose one of {BAD_FILE_POLICIES}"
            )
        self.on_bad_file = on_bad_file
        self.record_path = Path(record_path) if record_path else None
        self._seen: set[str] = set()

    def handle(self, path: str | os.PathLike, reason: str) -> None:
        key = printable_path(path)  # non-UTF-8 names must not break the log or the record
        if self.on_bad_file == "error":
            raise BadFileError(
                f"cannot read {one_line(key)}: {one_line(reason)} (set "
                f"data.on_bad_file=skip to skip such files)"
            )
        if key in self._seen:
            return
        self._seen.add(key)
        log.warning("skipping %s: %s", one_line(key), one_line(reason))
        if self.record_path is not None:
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            append_once(self.record_path, key, record_row(key, reason))


def recorded_paths(text: str) -> set[str]:
    """The paths (first fields) of the rows of a skipped-files TSV."""
    return {row[0] for row in csv.reader(io.StringIO(text), dialect="excel-tab") if row}


def append_once(record: Path, key: str, row: str) -> None:
    """Append `row` to `record` unless a row for `key` is there: every DataLoader worker has its own
    `_seen`, so the file itself (read under an exclusive lock) says what is listed. Opened without
    following links (`open_no_follow`): a link planted in a shared run folder is refused, not
    written through."""
    fd = open_no_follow(record, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        text = {"encoding": "utf-8", "errors": "backslashreplace", "newline": ""}
        with os.fdopen(fd, "r+", closefd=False, **text) as f:
            f.seek(0)
            if key not in recorded_paths(f.read()):
                f.write(row)  # one write: rows from several worker processes do not mix
    finally:
        os.close(fd)  # ends the lock


def require_one_readable(
    count: int, load, name_of, policy: BadFilePolicy, what: str, hint: str
) -> None:
    """Fail at start-up when none of `count` items can be loaded: try `load(i)` in order until
    one works (usually the first). With on_bad_file=error the first failure stops the run through
    the policy."""
    first_failure = None
    for i in range(count):
        try:
            load(i)
            return
        except Exception as error:
            if policy.on_bad_file == "error":
                policy.handle(name_of(i), failure_reason(error))
            first_failure = first_failure or (name_of(i), failure_reason(error))
    if first_failure is None:
        return  # nothing to read: the caller names an empty split
    name, reason = first_failure
    raise ValueError(
        f"none of the {count} {what} can be read (the first, {name}: {reason}); {hint}"
    )
