"""Crash-safe checkpoint files: written beside the target, synced, then renamed into place; loaded safely.

A kill or a full disk during a save leaves at most a `*.tmp` file behind; the previous checkpoint of that name
is never truncated. Loading goes through `read_checkpoint` (weights_only=True): nothing is unpickled that could
run code.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from selfflow.training.checkpoint import read_checkpoint

TEMP_SUFFIX = ".tmp"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the earlier checkpoints are intact."""


def atomic_save(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save to `<path>.<pid>.tmp`, fsync, rename over `path`, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        with open(temp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise CheckpointWriteError(
            f"cannot write checkpoint {path}: {error.strerror or error}; the checkpoints written before are "
            f"intact. Free space in {path.parent} (or fix its permissions) and resume with resume=auto"
        ) from error
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    try:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:  # some filesystems cannot sync a directory; the rename itself is done
        pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, with atomic writes and weights-only loading."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return read_checkpoint(path)
