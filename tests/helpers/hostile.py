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


class WritesOnLoad(torch.nn.Module):
    """A TorchScript autoencoder whose `__setstate__` (run by torch.jit.load) creates the file
    `marker`: TorchScript
    can write files, so loading one is running code."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.mapped = torch.zeros(1)

    @torch.jit.export
    def __getstate__(self) -> list[str]:
        return [self.marker]

    @torch.jit.export
    def __setstate__(self, state: list[str]) -> None:
        self.marker, self.training = state[0], False
        # shared=True creates the file
        self.mapped = torch.from_file(state[0], True, 1, dtype=torch.float32)

    @torch.jit.export
    def encode(self, wave: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, 1, S]
        return wave.unsqueeze(1)

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, 0]


def autoencoder_writing_on_load(path: Path, marker: Path) -> Path:
    """A TorchScript file that creates `marker` when anything loads it (saving it creates
    nothing)."""
    torch.jit.save(torch.jit.script(WritesOnLoad(str(marker))), str(path))
    assert not marker.exists()
    return path
