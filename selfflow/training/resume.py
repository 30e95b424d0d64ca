"""Resuming a run: which checkpoint to continue from, and keeping the metric history written before it."""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from selfflow.training.checkpoint import read_checkpoint

log = logging.getLogger("selfflow")

RESUME_MODES = ("auto",)


def newest_valid_checkpoint(folder: str | os.PathLike) -> tuple[Path, int] | None:
    """The `*.ckpt` file under `folder` with the highest step that loads safely (temporary, truncated or foreign
    files are passed over with a warning); None if there is none."""
    folder = Path(folder)
    candidates = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    best: tuple[int, float, Path] | None = None
    for path in candidates:
        try:
            step = int(read_checkpoint(path, mmap=True).get("global_step", 0))
        except (ValueError, OSError) as error:
            log.warning("not resuming from %s: %s", path, error)
            continue
        key = (step, path.stat().st_mtime, path)
        if best is None or key[:2] > best[:2]:
            best = key
    return (best[2], best[0]) if best else None


def resolve_resume(run_dir: str | os.PathLike, ckpt_path: str | None, resume: str | None) -> str | None:
    """The checkpoint to resume from: `ckpt_path` as given, or with resume=auto the newest valid one in the run
    directory's checkpoints/ (None: start afresh)."""
    if resume in (None, "", "none", "never"):
        return ckpt_path
    if resume not in RESUME_MODES:
        raise ValueError(f"resume={resume!r} is unknown; choose auto (the newest valid checkpoint of the run "
                         f"directory) or null, or give ckpt_path=PATH")
    if ckpt_path:
        raise ValueError(f"ckpt_path={ckpt_path} and resume={resume} both choose a checkpoint; give only one")
    found = newest_valid_checkpoint(Path(run_dir) / "checkpoints")
    if found is None:
        log.info("resume=auto: no valid checkpoint in %s/checkpoints; starting a new run", run_dir)
        return None
    log.info("resume=auto: resuming from %s (step %d)", found[0], found[1])
    return str(found[0])


def keep_metric_history(loggers, before_step: int, saved_row: dict | None = None) -> None:
    """CSVLogger deletes an existing metrics.csv when it starts; put back its rows of steps before the resumed
    step (and `saved_row`, the checkpointed step's own row, if the file never got it), so that the file of a
    resumed run reads as if the run had never stopped."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) < before_step]
        kept = [{k: _number(v) for k, v in row.items() if v not in ("", None)} for row in rows]
        if saved_row and saved_row["step"] < before_step and not any(
                "train/loss" in row and row["step"] == saved_row["step"] for row in kept):
            kept.append(dict(saved_row))
        logger.experiment.metrics[:0] = kept  # the writer (created here) removed the file; it rewrites these first


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text
