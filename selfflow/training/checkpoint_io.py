"""Crash-safe checkpoint files: written beside the target, synced, then renamed into place;
loaded safely.

A kill or a full disk during a save leaves at most a `.<name>.*.tmp` folder behind; the previous
checkpoint of that name is never truncated. Loading goes through `read_checkpoint`
(weights_only=True): nothing is unpickled that could run code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from selfflow.interop.checkpoint import read_checkpoint
from selfflow.io.safe_files import replace_atomically


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the earlier checkpoints
    are intact."""


# torch.save reports a failed write (a full disk) as a RuntimeError of its zip writer, not as
# an OSError
WRITE_FAILURES = re.compile(r"PytorchStreamWriter failed|file write failed|unexpected pos")


def is_write_failure(error: BaseException) -> bool:
    return bool(WRITE_FAILURES.search(str(error)))


def write_failure_line(error: BaseException) -> str:
    """One line for torch's multi-line writer error, e.g. "PytorchStreamWriter failed writing
    file data/0: file write failed (is the disk full?)"."""
    found = re.search(r"PytorchStreamWriter failed[^\n]*", str(error))
    return f"{found[0].strip() if found else 'the write failed'} (is the disk full?)"


def atomic_save(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save into a temporary file created exclusively beside `path`, fsync, rename over
    `path`, fsync the folder (`replace_atomically`: a link planted under the checkpoint's name is
    replaced, never written through)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replace_atomically(path, sync=True) as file:
            torch.save(checkpoint, file)
    except (OSError, RuntimeError) as error:
        if isinstance(error, OSError):
            cause = error.strerror or str(error)
        elif is_write_failure(error):
            cause = write_failure_line(error)
        else:
            raise
        raise CheckpointWriteError(
            f"cannot write checkpoint {path}: {cause}; the checkpoints written before are "
            f"intact. Free space in {path.parent} (or fix its permissions) "
            f"and resume with resume=auto"
        ) from error


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, with atomic writes and weights-only loading."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Any | None = None
    ) -> None:
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict:
        return read_checkpoint(path)
