"""`selfflow-train` without the command line: seed, build, fit, and say where the outputs are."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from selfflow.interop.checkpoint import read_checkpoint
from selfflow.training.build import Run, build_run, run_config
from selfflow.training.console import keep_library_banners_off_the_console
from selfflow.training.resume import (
    check_folder_of_this_run,
    check_same_run,
    keep_metric_history,
    resolve_resume,
)
from selfflow.training.run_folder import run_folder_lock
from selfflow.training.validate import validate_config

log = logging.getLogger("selfflow")


def quiet_known_warnings() -> None:
    """Warnings Lightning gives about things selfflow does on purpose."""
    warnings.filterwarnings(
        "ignore", message=r"Found \d+ module\(s\) in eval mode"
    )  # the EMA teacher
    warnings.filterwarnings(
        "ignore", message=r"The number of training batches .* is smaller than the logging"
    )
    warnings.filterwarnings(
        "ignore", message=r"Experiment logs directory .* exists and is not empty"
    )  # Hydra's files
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings(
        "ignore", message=r"`training_step` returned `None`"
    )  # a skipped non-finite step
    # the resumable data position lives in SelfFlowDataModule.state_dict, which Lightning does not
    # look at here
    warnings.filterwarnings(
        "ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended"
    )


def train(cfg: DictConfig) -> Run:
    """Validate the config, lock the run folder, pick the checkpoint to resume from (checked before
    any data is read; with resume=auto it must be this run's), build, fit."""
    quiet_known_warnings()
    keep_library_banners_off_the_console()
    validate_config(cfg)
    with run_folder_lock(cfg.run_dir):
        ckpt_path = resolve_resume(cfg.run_dir, cfg.get("ckpt_path"), cfg.get("resume"))
        check_folder_of_this_run(cfg.run_dir, ckpt_path)
        resumed = (
            read_checkpoint(ckpt_path, mmap=True) if ckpt_path else None
        )  # refused here if unsafe or corrupt
        if (
            resumed is not None
            and cfg.get("resume") == "auto"
            and not cfg.get("resume_allow_changes")
        ):
            check_same_run(resumed["selfflow_config"], run_config(cfg), ckpt_path)
        L.seed_everything(cfg.seed, workers=True)
        run = build_run(cfg)
        if resumed is not None and run.trainer.is_global_zero:
            keep_metric_history(
                run.trainer.loggers,
                int(resumed.get("global_step", 0)),
                resumed.get("selfflow_step_metrics"),
            )
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=ckpt_path)
        finish_wandb_runs(run.trainer.loggers)
    if run.trainer.is_global_zero:
        print(describe_outputs(run.run_dir))
    return run


def finish_wandb_runs(loggers) -> None:
    """End the wandb run of each WandbLogger (Lightning leaves it open), so that the next job of a
    multirun, in the same process, starts its own run instead of writing into this one."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):  # other ranks get a no-op stand-in
            logger.experiment.finish()


def describe_outputs(run_dir: Path) -> str:
    lines = [f"selfflow: run finished; outputs in {run_dir.resolve()}"]
    for label, pattern in (
        ("checkpoint", "checkpoints/last.ckpt"),
        ("metrics", "metrics.csv"),
        ("samples", "samples/*/final.png"),
        ("skipped files", "skipped_files.tsv"),
    ):
        for path in sorted(run_dir.glob(pattern)):
            lines.append(f"  {label:>13}: {path.resolve()}")
    return "\n".join(lines)
