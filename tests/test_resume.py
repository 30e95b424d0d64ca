"""Exact resume: a run killed with SIGKILL (at a checkpoint, or in the middle of writing one) and
continued with resume=auto produces the same per-step losses and final weights as a run that was
never interrupted."""

import random
import shutil
from pathlib import Path

import pytest

from selfflow.interop.checkpoint import read_checkpoint
from selfflow.training.resume import newest_valid_checkpoint
from tests.helpers.configs import SMALL_JOINT, TINY
from tests.helpers.files import write_noise_images
from tests.helpers.runs import (
    EVERY,
    MAX_STEPS,
    assert_same_run,
    finish,
    kill_when,
    losses,
    resume_run_args,
    start,
)


def train_args(images: Path, run_dir: Path, workers: int, *extra: str) -> list[str]:
    return resume_run_args(["data=image_folder"], images, run_dir, workers, *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (no DataLoader workers) and its images."""
    base = tmp_path_factory.mktemp("reference")
    images = write_noise_images(base / "images")
    finish(start(train_args(images, base / "run", workers=0), cwd=base))
    return images, base / "run"


@pytest.mark.slow
def test_sigkill_at_random_checkpoints_then_resume_auto_gives_the_same_losses(reference, tmp_path):
    images, reference_run = reference
    run_dir = tmp_path / "run"
    first, second = sorted(random.sample(range(EVERY, MAX_STEPS - EVERY, EVERY), 2))
    # killed twice, with DataLoader workers this time (the data order and augmentation must not
    # depend on them)
    kill_when(
        start(train_args(images, run_dir, 2), tmp_path),
        run_dir / "checkpoints" / f"step_{first:07d}.ckpt",
    )
    kill_when(
        start(train_args(images, run_dir, 2, "resume=auto"), tmp_path),
        run_dir / "checkpoints" / f"step_{second:07d}.ckpt",
    )
    finish(start(train_args(images, run_dir, 2, "resume=auto"), tmp_path))
    assert_same_run(reference_run, run_dir)


SLOW_SAVE = """
import pathlib, sys, time, io, torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    name = getattr(f, "name", "")
    if "step_{step:07d}" in str(name):  # write half the checkpoint, then hang until killed
        buffer = io.BytesIO(); real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2]); f.flush()
        pathlib.Path(r"{marker}").touch(); time.sleep(600)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from selfflow.cli.train import main
sys.argv = ["selfflow-train", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_intact(reference, tmp_path):
    images, reference_run = reference
    run_dir, marker = tmp_path / "run", tmp_path / "saving"
    step = random.choice(range(2 * EVERY, MAX_STEPS - EVERY, EVERY))
    script = SLOW_SAVE.format(step=step, marker=marker)
    kill_when(start(train_args(images, run_dir, 0), tmp_path, script=script), marker)
    folder = run_dir / "checkpoints"
    assert not (folder / f"step_{step:07d}.ckpt").exists()
    # the half-written file never took the real name
    assert list(folder.glob(f".step_{step:07d}.ckpt.*.tmp"))
    assert (
        read_checkpoint(folder / "last.ckpt")["global_step"] == step - EVERY
    )  # the previous one, intact
    assert newest_valid_checkpoint(folder)[1] == step - EVERY
    finish(start(train_args(images, run_dir, 0, "resume=auto"), tmp_path))
    assert_same_run(reference_run, run_dir)


def test_in_process_resume_from_a_mid_epoch_checkpoint_repeats_the_losses(tiny_train_cfg, tmp_path):
    from selfflow.training.run import train

    images = write_noise_images(tmp_path / "images")
    args = [
        "data=image_folder",
        f"data.root={images}",
        "data.dataset.image_size=8",
        "data.dataset.hflip=true",
        "tokenizer.image.patch_size=2",
        "trainer.max_steps=7",
        "callbacks.checkpoint.every_n_train_steps=3",
        "callbacks.samples.every_n_steps=0",
        "callbacks.checkpoint.save_top_k=-1",
    ]
    train(tiny_train_cfg(*args, run_dir=tmp_path / "a"))
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)  # step 3 = the middle of the second epoch
    shutil.copy(
        tmp_path / "a" / "checkpoints" / "step_0000003.ckpt", tmp_path / "b" / "checkpoints"
    )
    train(tiny_train_cfg(*args, "resume=auto", run_dir=tmp_path / "b"))
    expected = losses(tmp_path / "a")
    assert sorted(expected) == list(range(7))
    assert losses(tmp_path / "b") == {k: v for k, v in expected.items() if k >= 3}
    assert (
        tmp_path / "a" / "checkpoints" / "step_0000007.ckpt"
    ).is_file()  # saved at the end, off the interval


JOINT_EPOCH, JOINT_STEPS = 4, 10  # the joint default, made small, in epochs of JOINT_EPOCH batches


def joint_args(run_dir: Path, mode: str, workers: int, *extra: str) -> list[str]:
    return [
        *TINY,
        *SMALL_JOINT,
        f"data.mode={mode}",
        f"data.num_workers={workers}",
        f"data.batches_per_epoch={JOINT_EPOCH}",
        f"trainer.max_steps={JOINT_STEPS}",
        f"callbacks.checkpoint.every_n_train_steps={JOINT_EPOCH}",
        "~callbacks.samples",
        "~callbacks.probe",
        "seed=7",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("mode, workers", [("per_step", 2), ("packed", 0)])
def test_joint_run_killed_at_the_last_batch_of_an_epoch_resumes_exactly(mode, workers, tmp_path):
    """The checkpoint of step JOINT_EPOCH is taken at the last batch of epoch 0, when the loader has
    already started on epoch 1: the resumed run must start epoch 1 at its first batch, not skip to
    epoch 2."""
    pytest.importorskip("espeakng_loader")
    finish(start(joint_args(tmp_path / "reference", mode, workers), tmp_path))
    run_dir = tmp_path / "run"
    kill_when(
        start(joint_args(run_dir, mode, workers), tmp_path),
        run_dir / "checkpoints" / f"step_{JOINT_EPOCH:07d}.ckpt",
    )
    finish(start(joint_args(run_dir, mode, workers, "resume=auto"), tmp_path))
    assert_same_run(tmp_path / "reference", run_dir, JOINT_STEPS)
