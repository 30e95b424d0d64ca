"""Crash-safe and safe checkpoints, non-finite losses, config validation: each promise of
docs/reliability.md."""

import dataclasses
import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from selfflow.data.builtin.digits import DigitImages
from selfflow.interop.checkpoint import read_checkpoint
from selfflow.training.build import build_run
from selfflow.training.checkpoint_io import CheckpointWriteError, atomic_save
from selfflow.training.nonfinite import NonFiniteLossError
from selfflow.training.resume import newest_valid_checkpoint
from selfflow.training.run import train
from selfflow.training.validate import ConfigError, validate_config
from tests.helpers.configs import SMALL_JOINT, TINY
from tests.helpers.hostile import hostile_checkpoint


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- crash-safe writes ----------------------------------------------------------------------------


def test_atomic_save_replaces_the_file_only_when_the_write_succeeded(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": torch.tensor(1)}, path)
    before = digest(path)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"x" * 1000)  # part of the file got out, then the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(
        CheckpointWriteError,
        match=r"cannot write checkpoint .*last.ckpt: No space left on device.*"
        r"intact.*resume=auto",
    ):
        atomic_save({"step": torch.tensor(2)}, path)
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.ckpt"
    ]  # no temporary file left behind
    assert int(torch.load(path, weights_only=True)["step"]) == 1


def test_full_disk_during_training_stops_with_one_clear_error_and_keeps_the_last_checkpoint(
    tiny_train_cfg, tmp_path, monkeypatch
):
    run = build_run(tiny_train_cfg("trainer.max_steps=6", "callbacks.samples.every_n_steps=0"))
    real_save = torch.save

    def fill_up_at_step_4(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step") == 4:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fill_up_at_step_4)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        run.trainer.fit(run.module, datamodule=run.datamodule)
    folder = Path(run.run_dir) / "checkpoints"
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 2
    assert not list(folder.glob("*.tmp"))
    assert newest_valid_checkpoint(folder)[1] == 2


def test_resume_auto_passes_over_truncated_temporary_and_unsafe_files(tiny_train_cfg, tmp_path):
    run = build_run(tiny_train_cfg("trainer.max_steps=4", "callbacks.samples.every_n_steps=0"))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    folder = Path(run.run_dir) / "checkpoints"
    good = folder / "step_0000004.ckpt"
    (folder / "step_0000009.ckpt").write_bytes(
        good.read_bytes()[: good.stat().st_size // 2]
    )  # truncated
    (folder / "step_0000010.ckpt.123.tmp").write_bytes(good.read_bytes())  # an unfinished save
    hostile_checkpoint(folder / "step_0000011.ckpt", tmp_path / "pwned")
    path, step = newest_valid_checkpoint(folder)
    assert step == 4 and path.name in ("last.ckpt", "step_0000004.ckpt")
    assert not (tmp_path / "pwned").exists()


# --- safe loading ---------------------------------------------------------------------------------


def test_resume_loads_weights_only_and_never_runs_a_malicious_pickle(tiny_train_cfg, tmp_path):
    marker = tmp_path / "pwned"
    evil = hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(ValueError, match="cannot load checkpoint .*evil.ckpt safely"):
        train(tiny_train_cfg(f"ckpt_path={evil}"))
    run = build_run(
        tiny_train_cfg()
    )  # Lightning's own loading path goes through the same safe reader
    with pytest.raises(ValueError, match="safely"):
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=str(evil))
    assert not marker.exists()


@pytest.mark.slow
def test_cli_refuses_a_malicious_checkpoint_with_one_line(tmp_path):
    marker = tmp_path / "pwned"
    evil = hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "selfflow.cli.train",
            *TINY,
            f"ckpt_path={evil}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert result.returncode == 2
    assert (
        "selfflow-train: error: cannot load checkpoint" in result.stderr
        and "Traceback" not in result.stderr
    )
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resuming_into_another_architecture_names_the_first_mismatched_key(
    tiny_train_cfg, tmp_path
):
    first = build_run(
        tiny_train_cfg(
            "trainer.max_steps=2", "callbacks.samples.every_n_steps=0", run_dir=tmp_path / "a"
        )
    )
    first.trainer.fit(first.module, datamodule=first.datamodule)
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(
        ValueError,
        match=r"does not fit this model: '.*' has shape \(.*32.*\) in the checkpoint "
        r"but \(.*64.*\) in the model",
    ):
        train(tiny_train_cfg("model.width=64", f"ckpt_path={ckpt}", run_dir=tmp_path / "b"))


# --- non-finite losses ----------------------------------------------------------------------------


class PoisonBatches(L.Callback):
    """Puts NaN into the input data of the micro-batches with the given indices."""

    def __init__(self, batch_indices: set[int]):
        self.batch_indices = batch_indices

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx in self.batch_indices:
            batch["data"].fill_(float("nan"))


def after_each_batch(trainer) -> list[dict]:
    """Per training batch, at its end: global_step, the learning rate, student and EMA weights."""
    after = []

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            after.append(
                {
                    "step": trainer.global_step,
                    "lr": trainer.optimizers[0].param_groups[0]["lr"],
                    "student": [p.detach().clone() for p in module.model.parameters()],
                    "ema": [p.detach().clone() for p in module.ema_model.parameters()],
                }
            )

    trainer.callbacks.append(Capture())
    return after


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def inject_nan(module, batches: set[int]) -> None:
    """Make the objective's loss NaN at the given training batches (0-based calls of the
    objective)."""
    forward = module.objective.forward
    calls = iter(range(10**6))

    def nan_at_batches(*args, **kwargs):
        out = forward(*args, **kwargs)
        poisoned = next(calls) in batches
        return dataclasses.replace(out, loss=out.loss * float("nan")) if poisoned else out

    module.objective.forward = nan_at_batches


def test_a_nan_loss_skips_the_update_and_is_counted(tiny_train_cfg):
    run = build_run(tiny_train_cfg("trainer.max_steps=5", "callbacks.samples.every_n_steps=0"))
    inject_nan(run.module, {2})
    after = after_each_batch(run.trainer)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert same(after[1]["student"], after[2]["student"])  # no optimizer update at the NaN batch
    assert same(after[1]["ema"], after[2]["ema"])  # no EMA update either
    assert not same(after[2]["student"], after[3]["student"])  # and training goes on afterwards
    # the skipped batch is no step of max_steps
    assert len(after) == 6 and run.trainer.global_step == 5
    assert int(run.module.objective.teacher.num_updates) == 5
    assert run.module.nonfinite.skipped == 1
    import csv

    with open(Path(run.run_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/nonfinite_skipped")]
    counts = [(int(r["step"]), float(r["train/nonfinite_skipped"])) for r in rows]
    assert all(count == 0.0 for step, count in counts if step < 2)
    assert counts[-1][1] == 1.0
    assert all(torch.isfinite(p).all() for p in run.module.parameters())


def test_a_skipped_update_advances_neither_the_step_nor_the_learning_rate(tiny_train_cfg):
    """During the warm-up the learning rate grows every step; a skipped update keeps both where they
    were."""
    overrides = ("trainer.max_steps=4", "lr_warmup_steps=10", "callbacks.samples.every_n_steps=0")
    run = build_run(tiny_train_cfg(*overrides))
    inject_nan(run.module, {2})
    after = after_each_batch(run.trainer)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert [a["step"] for a in after] == [1, 2, 2, 3, 4]
    lrs = [a["lr"] for a in after]
    assert lrs[2] == lrs[1] and lrs[3] > lrs[2]
    scheduler = run.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 4  # one schedule step per completed update


def test_too_many_nan_losses_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(
    tiny_train_cfg,
):
    run = build_run(
        tiny_train_cfg(
            "trainer.max_steps=20", "max_nonfinite_in_a_row=3", "callbacks.samples.every_n_steps=0"
        )
    )
    inject_nan(run.module, set(range(3, 20)))
    with pytest.raises(
        NonFiniteLossError,
        match=r"the loss was nan for 3 steps in a row .*learning rate.*"
        r"precision.*resume=auto",
    ):
        run.trainer.fit(run.module, datamodule=run.datamodule)
    folder = Path(run.run_dir) / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step_0000002.ckpt"]
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 2


def test_a_non_finite_gradient_is_skipped_like_a_non_finite_loss(tiny_train_cfg):
    run = build_run(tiny_train_cfg("trainer.max_steps=3", "callbacks.samples.every_n_steps=0"))
    weight = run.module.model.blocks[0].attn.qkv.weight
    poisoned = iter(range(10**6))
    hook = weight.register_hook(lambda grad: grad * float("inf") if next(poisoned) == 1 else grad)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    hook.remove()
    assert run.module.nonfinite.skipped == 1
    assert int(run.module.objective.teacher.num_updates) == 3 and run.trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in run.module.parameters())


@pytest.mark.parametrize("poisoned", [2, 3], ids=["first-micro-batch", "second-micro-batch"])
def test_a_nan_in_any_micro_batch_skips_the_whole_accumulated_update(tiny_train_cfg, poisoned):
    """Two micro-batches per optimizer step; a NaN in either of step 1's (batches 2 and 3) skips
    step 1 whole: no optimizer step with the other micro-batch's gradients, no EMA update, one
    skip counted."""
    run = build_run(
        tiny_train_cfg(
            "trainer.max_steps=3",
            "trainer.accumulate_grad_batches=2",
            "callbacks.samples.every_n_steps=0",
        )
    )
    run.trainer.callbacks.append(PoisonBatches({poisoned}))
    after = after_each_batch(run.trainer)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    for kind in ("student", "ema"):  # batches 1 (step 1 done) and 3 (step 1's skipped update)
        assert same(after[1][kind], after[3][kind])
    assert not same(after[3]["student"], after[5]["student"])  # training goes on afterwards
    assert [a["step"] for a in after] == [0, 1, 1, 1, 1, 2, 2, 3]
    assert run.module.nonfinite.skipped == 1
    assert int(run.module.objective.teacher.num_updates) == 3
    optimizer = run.trainer.optimizers[0]
    # the skipped step left Adam alone
    assert {int(state["step"]) for state in optimizer.state.values()} == {3}
    assert all(torch.isfinite(p).all() for p in run.module.parameters())


# --- config validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective.mask_ratio=0.6", "objective.mask_ratio=0.6 is out of range"),
        ("objective.mask_ratio.image=0.7", "objective.mask_ratio.image=0.7 is out of range"),
        (
            "objective.student_layer=2",
            r"objective.student_layer=2 and objective.teacher_layer=2 must satisfy 1 <= "
            r"student_layer < teacher_layer <= model depth \(2\)",
        ),
        (
            "objective.teacher_layer=3",
            r"objective.teacher_layer=3 must satisfy .* <= model depth \(2\)",
        ),
        ("objective.gamma=-0.5", r"objective.gamma=-0.5 must be one number >= 0"),
        ("objective.gamma=[0.8,0.2]", r"objective.gamma=\[0.8, 0.2\] must be one number >= 0 "),
        ("objective.ema_decay=1.0", r"objective.ema_decay=1.0 must be in \[0, 1\)"),
        ("objective.loss_buckets=0", "objective.loss_buckets=0 must be an integer >= 1"),
        ("model.heads=3", "model.width=32 must be a multiple of model.heads=3"),
        ("data.batch_size=-8", "data.batch_size=-8 must be an integer >= 1"),
        ("data.num_workers=-1", "data.num_workers=-1 must be an integer >= 0"),
        (
            "trainer.log_every_n_steps=0",
            r"trainer.log_every_n_steps=0 is out of range: use an integer in \[1, inf\)",
        ),
        # Lightning trains 2 steps for 1.5 and none for 0, without a word
        ("trainer.max_steps=1.5", r"^trainer.max_steps=1.5 is not a limit the run can reach: use"),
        ("trainer.max_steps=0", r"^trainer.max_steps=0 is not a limit .* \(or -1 for no limit\)$"),
        ("trainer.max_epochs=0", r"^trainer.max_epochs=0 is not a limit the run can reach"),
        ("optimizer.lr=-0.1", "optimizer: Invalid learning rate: -0.1"),
        (
            "lr_warmup_steps=-1",
            r"lr_schedule.warmup_steps=-1 must be an integer >= 0 \(lr_warmup_steps sets it too\)",
        ),
        (
            "lr_schedule=cosine lr_warmup_steps=0 lr_schedule.min_lr=1",
            r"lr_schedule.min_lr=1.0 is above optimizer.lr=0.001",
        ),
        ("max_nonfinite_in_a_row=0", "max_nonfinite_in_a_row=0 must be >= 1"),
        (
            "callbacks.checkpoint.save_top_k=-2",
            "callbacks.checkpoint: Invalid value for save_top_k=-2. Must be >= -1",
        ),
        (
            "objective.mask_mode=random",
            r"objective.mask_mode='random' is unknown; choose one of: exact, bernoulli",
        ),
        ("resume=sometimes", "resume='sometimes' is unknown; choose one of: null, auto"),
        (
            "+objective.mask_ration=0.3",
            "objective.mask_ration is not an option of SelfFlowObjective; did you "
            "mean objective.mask_ratio",
        ),
        ("data=image_folder", r"data.root must be set"),
        (
            "+tokenizer.image.image_size=32",
            "tokenizer.image.image_size is set, but the tokenizer takes image_size from the data",
        ),
    ],
)
def test_bad_configs_fail_before_any_work_with_one_line_naming_the_key(
    tiny_train_cfg, tmp_path, override, message, monkeypatch
):
    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the config was checked")

    monkeypatch.setattr(DigitImages, "__init__", no_data)
    cfg = tiny_train_cfg(*override.split())  # one or more overrides
    with pytest.raises(ConfigError, match=message) as error:
        validate_config(cfg)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError):
        train(cfg)
    assert not (tmp_path / "run").exists()  # nothing was written


def test_a_bad_joint_option_stops_before_any_source_is_read(tiny_train_cfg, monkeypatch, tmp_path):
    from selfflow.data.builtin.moving_digits import MovingDigits
    from selfflow.data.builtin.spoken_digits import SpokenDigits

    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the config was checked")

    for dataset in (DigitImages, MovingDigits, SpokenDigits):
        monkeypatch.setattr(dataset, "__init__", no_data)
    cfg = tiny_train_cfg(*SMALL_JOINT, "data.batch_size={image: 4, video: 0, audio: 2}")
    with pytest.raises(ConfigError, match=r"^data.batch_size.video=0 must be an integer >= 1$"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_range_lightning_checks_stops_the_run_before_any_data_is_read(
    tiny_train_cfg, monkeypatch
):
    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the trainer was built")

    monkeypatch.setattr(DigitImages, "__init__", no_data)
    with pytest.raises(ConfigError, match=r"trainer: .*invalid value -1 for limit_train_batches"):
        train(tiny_train_cfg("+trainer.limit_train_batches=-1"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, message",
    [
        (
            "objective.mask_ration=0.3",
            "objective.mask_ration is not a config key (typo?); did you mean objective.mask_ratio?",
        ),
        ("model=XXL", "model=XXL is not an option; choose one of: B, L, S, XL, base, tiny"),
        ("data.batch_size=-1", "data.batch_size=-1 must be an integer >= 1"),
    ],
)
def test_cli_bad_overrides_end_in_one_line_and_exit_status_2(tmp_path, override, message):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "selfflow.cli.train",
            *TINY,
            override,
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert result.returncode == 2
    first = result.stderr.strip().splitlines()[0]
    assert first.startswith("selfflow-train: error: ") and message in first, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- sharing weights without pickles --------------------------------------------------------------


def test_export_writes_safetensors_and_json_that_load_back_to_the_ema_model(
    tiny_train_cfg, tmp_path
):
    import json

    from selfflow.interop.checkpoint import load_checkpoint

    run = build_run(tiny_train_cfg("trainer.max_steps=2", "callbacks.samples.every_n_steps=0"))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    ckpt = Path(run.run_dir) / "checkpoints" / "last.ckpt"
    result = subprocess.run(
        [sys.executable, "-m", "selfflow.cli.export", str(ckpt), str(tmp_path / "export")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["files"] == ["model.safetensors", "config.json", "README.md"]
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["step"] == 2 and config["config"]["model"]["width"] == 32
    exported = load_checkpoint(tmp_path / "export")
    assert exported.step == 2 and list(exported.tokenizers) == ["image"]
    for (name, a), b in zip(
        exported.model.state_dict().items(), run.module.ema_model.state_dict().values()
    ):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(FileNotFoundError, match="not an exported model"):
        load_checkpoint(tmp_path)
