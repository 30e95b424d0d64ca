"""Runs of selfflow in tests: the tiny trained checkpoint, sampling and shard writing in-process,
and training subprocesses killed and restarted (exact-resume checks)."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from selfflow.cli.sample import sample
from selfflow.cli.shards import main as shards_cli
from selfflow.interop.checkpoint import read_checkpoint
from tests.helpers.configs import TINY, compose_sample, compose_train

ROOT = Path(__file__).resolve().parents[2]

# the resume runs: MAX_STEPS steps with a checkpoint every EVERY steps
MAX_STEPS = 40
EVERY = 4


def train_tiny_checkpoint(run_dir: Path) -> Path:
    """Train a 2-step tiny digits run (16x16 grey, patch 4: 16 tokens; no sample grids, no probe
    callback); its last checkpoint."""
    from selfflow.training.build import build_run

    run = build_run(
        compose_train(
            [
                "trainer.max_steps=2",
                "tokenizer.image.patch_size=4",
                "~callbacks.samples",
                "~callbacks.probe",
                "lr_warmup_steps=0",
                "optimizer.lr=0.01",
            ],  # visibly trained
            run_dir,
        )
    )
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return run_dir / "checkpoints" / "last.ckpt"


def run_sample(ckpt, out_dir, *overrides):
    """selfflow-sample in-process on `ckpt`, writing to `out_dir`; its summary."""
    return sample(compose_sample(f"ckpt={ckpt}", f"out_dir={out_dir}", *overrides))


def exit_status(argv: list[str]) -> int:
    """selfflow-shards' exit status for `argv` (user errors end in SystemExit(2))."""
    try:
        return shards_cli(argv)
    except SystemExit as stop:
        return stop.code


def start(args: list[str], cwd: Path, script: str | None = None) -> subprocess.Popen:
    """selfflow-train (or the Python `script`) with `args` in a subprocess."""
    command = (
        [sys.executable, "-c", script, *args]
        if script
        else [sys.executable, "-m", "selfflow.cli.train", *args]
    )
    return subprocess.Popen(
        command,
        cwd=cwd,
        env={**os.environ, "WANDB_MODE": "offline"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> None:
    _out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]


def kill_when(process: subprocess.Popen, path: Path, timeout: float = 300) -> None:
    """SIGKILL the process as soon as `path` exists (polled every few milliseconds)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, (
            f"the run ended before {path.name} appeared: {process.stderr.read()[-3000:]}"
        )
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.003)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL


def losses(run_dir: Path) -> dict[int, str]:
    """The train loss of every step of a run, as logged (the exact float's text)."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}


def assert_same_run(reference: Path, resumed: Path, max_steps: int = MAX_STEPS) -> None:
    expected, got = losses(reference), losses(resumed)
    assert sorted(expected) == list(range(max_steps))
    assert got == expected  # every step, bit for bit (the CSV holds the exact float)
    a = read_checkpoint(reference / "checkpoints" / "last.ckpt")
    b = read_checkpoint(resumed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == max_steps
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def train_cli(tmp_path: Path, name: str, *overrides: str) -> Path:
    """selfflow-train in a subprocess (tiny digits, 4 steps; each rank's state dumped under
    <run>/dump); its run folder."""
    run_dir = tmp_path / name
    exe = shutil.which("selfflow-train") or "selfflow-train"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    args = [
        *TINY,
        "trainer.max_steps=4",
        "callbacks.samples.every_n_steps=0",
        "callbacks.checkpoint.every_n_train_steps=4",
        f"hydra.run.dir={run_dir}",
        "+callbacks.dump._target_=tests.ddp_helpers.DumpRankState",
        f"+callbacks.dump.out_dir={run_dir / 'dump'}",
        *overrides,
    ]
    result = subprocess.run(
        [exe, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def resume_run_args(data: list[str], root, run_dir: Path, workers: int, *extra: str) -> list[str]:
    """The exact-resume run (8x8 images with flips, MAX_STEPS steps, a checkpoint every EVERY) on
    `data` at `root`."""
    return [
        *TINY,
        *data,
        f"data.root={root}",
        "data.dataset.image_size=8",
        "data.dataset.hflip=true",
        "tokenizer.image.patch_size=2",
        f"data.num_workers={workers}",
        f"trainer.max_steps={MAX_STEPS}",
        f"callbacks.checkpoint.every_n_train_steps={EVERY}",
        "callbacks.samples.every_n_steps=0",
        "seed=7",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
