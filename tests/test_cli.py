"""selfflow-train as a user runs it: a real subprocess, from another folder."""

import csv
import os
import subprocess
import sys

import pytest

from tests.helpers.configs import TINY


def run_cli(args, cwd, timeout=300):
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "selfflow.cli.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_train_cli_from_another_folder_writes_the_promised_outputs(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*TINY, "trainer.max_steps=4", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"outputs in {run_dir.resolve()}" in result.stdout
    for banner in (
        "GPU available",
        "TPU available",
        "Tip:",
        "`Trainer.fit` stopped",
    ):  # Lightning's, not ours
        assert banner not in result.stdout + result.stderr
    assert str(run_dir / "checkpoints" / "last.ckpt") in result.stdout
    assert (run_dir / "samples" / "image" / "final.png").is_file()
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [0, 1, 2, 3]
    assert (
        run_dir / ".hydra" / "config.yaml"
    ).is_file()  # the composed config is kept with the run


@pytest.mark.slow
def test_train_cli_help_lists_the_config_groups(tmp_path):
    result = run_cli(["--help"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0
    for group in ("data:", "model:", "objective:", "experiment:"):
        assert group in result.stdout
    assert "image_folder" in result.stdout and "XL" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, message",
    [
        ("objective.mask_ratio=0.7", "objective.mask_ratio=0.7 is out of range"),
        ("data=image_folder", "data.root"),
        ("objective.teacher_layer=1", "objective.teacher_layer=1"),
    ],
)
def test_train_cli_bad_config_fails_with_a_one_line_message(tmp_path, override, message):
    result = run_cli(
        [*TINY, override, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=120
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (
        tmp_path / "run"
    ).exists()  # a run that stops at start-up leaves no empty run folder


def test_the_progress_bar_counts_optimizer_steps_not_epochs():
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from selfflow.training.progress import StepProgressBar

    labels = []

    class Spy(StepProgressBar):
        def on_train_batch_end(self, trainer, *args, **kwargs):
            super().on_train_batch_end(trainer, *args, **kwargs)
            labels.append(self.progress.tasks[self.train_progress_bar_id].description)

    trainer = L.Trainer(
        max_steps=3,
        max_epochs=-1,
        limit_train_batches=2,
        limit_val_batches=0,
        callbacks=[Spy()],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(BoringModel())
    assert labels == [
        "step 1/3 (epoch 0)",
        "step 2/3 (epoch 0)",
        "step 3/3 (epoch 1)",
    ]  # not "Epoch 1/-2"
