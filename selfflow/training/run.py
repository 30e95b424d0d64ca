"""`selfflow-train` without the command line: seed, build, fit, and say where the outputs are."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from selfflow.training.build import Run, build_run

log = logging.getLogger("selfflow")


def quiet_known_warnings() -> None:
    """Warnings Lightning gives about things selfflow does on purpose."""
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")  # the EMA teacher
    warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging")
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")  # Hydra's files
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def train(cfg: DictConfig) -> Run:
    quiet_known_warnings()
    L.seed_everything(cfg.seed, workers=True)
    run = build_run(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=cfg.get("ckpt_path"))
    if run.trainer.is_global_zero:
        print(describe_outputs(run.run_dir))
    return run


def describe_outputs(run_dir: Path) -> str:
    lines = [f"selfflow: run finished; outputs in {run_dir.resolve()}"]
    for label, pattern in (("checkpoint", "checkpoints/last.ckpt"), ("metrics", "metrics.csv"),
                           ("samples", "samples/*/final.png"), ("skipped files", "skipped_files.tsv")):
        for path in sorted(run_dir.glob(pattern)):
            lines.append(f"  {label:>13}: {path.resolve()}")
    return "\n".join(lines)
