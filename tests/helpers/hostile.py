"""Crafted files that would run code if anything loaded them unsafely, and the harness that the
hostile-file tests share: crafted checkpoints, one-line refusals from the command line, and code
run under an address-space limit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


class CreatesAFile:
    """Unpickling this object calls `Path.touch(path)`: the side effect a safe loader must never
    let happen."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __reduce__(self):
        return (Path.touch, (self.path,))


def hostile_checkpoint(path: Path, marker: Path, **fields) -> Path:
    """A file in torch's own format (so that `torch.load` gets as far as unpickling it) that creates
    `marker` when loaded with weights_only=False; shaped like a selfflow checkpoint unless `fields`
    say otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"selfflow_config": {}, "global_step": 99, "state_dict": CreatesAFile(marker), **fields},
        path,
    )
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


class PlainAutoencoder(torch.nn.Module):
    """A harmless TorchScript audio autoencoder: wave [B, S] <-> latents [B, 1, S]."""

    @torch.jit.export
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
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


def crafted(source: Path, path: Path, edit) -> Path:
    """A copy of checkpoint `source` whose stored config `edit(config)` changed; it still loads with
    weights_only."""
    raw = torch.load(source, map_location="cpu", weights_only=True)
    edit(raw["selfflow_config"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(raw, path)
    return path


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


def run_cli(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "offline"},
    )


def assert_one_line_exit_2(
    result: subprocess.CompletedProcess,
    command: str,
    *expected: str,
) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    first = result.stderr.strip().splitlines()[0]
    assert first.startswith(f"{command}: error: "), result.stderr
    for text in expected:
        assert text in first, result.stderr
    assert "Traceback" not in result.stderr


HEADROOM_MB = 300


def run_bounded(code: str, headroom_mb: int = HEADROOM_MB) -> str:
    """Run `code` where the address space may grow `headroom_mb` at most; returns its output (stdout
    + stderr). `refusal(load)` there gives what a load raised, as the one line a skipped file gets,
    or "loaded"."""
    prelude = textwrap.dedent(f"""
        import resource
        import torch, torchaudio, av, soundfile, PIL.Image
        import selfflow.data.shards.dataset
        from selfflow.io.bad_files import failure_reason
        torch.set_num_threads(1)

        def refusal(load):
            try:
                load()
            except Exception as error:
                return failure_reason(error).splitlines()[0]
            return "loaded"

        status = open("/proc/self/status").read()
        limit = int(status.split("VmSize:")[1].split()[0]) * 1024 + ({headroom_mb} << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        """)
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def lines_of(output: str) -> dict[str, str]:
    """`case: outcome` lines printed by a bounded run."""
    return dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)
