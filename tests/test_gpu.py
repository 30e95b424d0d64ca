"""GPU-only checks of the scale switches (skipped without CUDA): FSDP with the EMA teacher, bf16
through the CLI, the joint default in bf16 (per-step and packed)."""

import csv
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers.configs import TINY

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def train_on_gpu(tmp_path: Path, *overrides: str) -> Path:
    run_dir = tmp_path / "run"
    exe = shutil.which("selfflow-train") or "selfflow-train"
    args = [
        *TINY,
        "trainer.accelerator=gpu",
        "trainer.devices=1",
        "trainer.max_steps=6",
        "callbacks.samples.every_n_steps=0",
        "~callbacks.probe",
        "callbacks.checkpoint.every_n_train_steps=6",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline"}
    result = subprocess.run(
        [exe, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


@pytest.mark.parametrize("strategy", ["default", "fsdp"])
def test_bf16_training_on_gpu_keeps_an_ema_teacher_and_a_loadable_checkpoint(tmp_path, strategy):
    from selfflow.interop.checkpoint import load_checkpoint, read_checkpoint

    run_dir = train_on_gpu(tmp_path, f"trainer={strategy}", "trainer.precision=bf16-mixed")
    with open(run_dir / "metrics.csv") as f:
        losses = [
            float(r["train/loss_flow"]) for r in csv.DictReader(f) if r.get("train/loss_flow")
        ]
    assert losses and all(math.isfinite(v) for v in losses)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = read_checkpoint(ckpt)["state_dict"]
    assert int(state["objective.teacher.num_updates"]) == 6  # one EMA update per optimizer step
    ema, online = load_checkpoint(ckpt, "ema").model, load_checkpoint(ckpt, "online").model
    # full (unsharded) weights in the file: every tensor has the shape of a freshly built model's
    for (name, a), (_, b) in zip(ema.state_dict().items(), online.state_dict().items()):
        assert a.shape == b.shape and torch.isfinite(a).all(), name
    moved = [
        name for name, p in online.named_parameters() if not torch.equal(p, ema.get_parameter(name))
    ]
    assert moved, "the EMA teacher should lag the online weights"


@pytest.mark.parametrize("mode", ["per_step", "packed"])
def test_the_joint_default_trains_in_bf16_on_gpu_and_samples_every_modality(tmp_path, mode):
    run_dir = train_on_gpu(
        tmp_path,
        "experiment=multimodal_digits",
        f"data.mode={mode}",
        "data.batch_size=16",
        "trainer.precision=bf16-mixed",
    )
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss_flow"]) for r in rows if r.get("train/loss_flow")]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    for modality in ("image", "video", "audio"):
        assert (run_dir / "samples" / modality / "final.png").is_file(), modality
