"""Crafted files that would run code if anything unpickled them unsafely."""

from __future__ import annotations

from pathlib import Path

import torch


class CreatesAFile:
    """Unpickling this object calls `Path.touch(path)`: the side effect a safe loader must never let happen."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __reduce__(self):
        return (Path.touch, (self.path,))


def hostile_checkpoint(path: Path, marker: Path, **fields) -> Path:
    """A file in torch's own format (so that `torch.load` gets as far as unpickling it) that creates `marker` when
    loaded with weights_only=False; shaped like a selfflow checkpoint unless `fields` say otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"selfflow_config": {}, "global_step": 99, "state_dict": CreatesAFile(marker), **fields}, path)
    return path
