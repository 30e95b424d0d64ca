"""Resuming a run: which checkpoint to continue from, and keeping the metric history written
before it."""

from __future__ import annotations

import csv
import fnmatch
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from selfflow.interop.checkpoint import read_checkpoint
from selfflow.safe_config import with_current_targets

log = logging.getLogger("selfflow")

RESUME_MODES = ("auto",)
# keys that may change when a run is continued (where it runs, how long, how it loads and logs): a
# difference in any other key means the checkpoint of the run folder belongs to another run
# (patterns over dotted keys)
RESUMABLE_CHANGES = (
    "run_dir",
    "ckpt_path",
    "resume",
    "resume_allow_changes",
    "cache_dir",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "data.num_workers",
    "data.pin_memory",
    "data.sources.*.num_workers",
    "data.sources.*.pin_memory",
    "logger",
    "callbacks",
    # a VAE's identity is its fingerprint, checked when the checkpoint loads: it may move folders
    "*.vae",
    "*.fingerprint",
    "objective.encoder",  # REPA's encoder: checked by its fingerprint, it may move folders
)
SHOWN_DIFFERENCES = 4
ABSENT = "<absent>"


def newest_valid_checkpoint(folder: str | os.PathLike) -> tuple[Path, int] | None:
    """The `*.ckpt` file under `folder` with the highest step that loads safely (temporary,
    truncated or foreign files are passed over with a warning); None if there is none."""
    folder = Path(folder)
    candidates = (
        sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
        if folder.is_dir()
        else []
    )
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


def resolve_resume(
    run_dir: str | os.PathLike, ckpt_path: str | None, resume: str | None
) -> str | None:
    """The checkpoint to resume from: `ckpt_path` as given, or with resume=auto the newest valid one
    in the run directory's checkpoints/ (None: start afresh)."""
    if resume in (None, "", "none", "never"):
        return ckpt_path
    if resume not in RESUME_MODES:
        raise ValueError(
            f"resume={resume!r} is unknown; choose auto (the newest valid checkpoint of the run "
            f"directory) or null, or give ckpt_path=PATH"
        )
    if ckpt_path:
        raise ValueError(
            f"ckpt_path={ckpt_path} and resume={resume} both choose a checkpoint; give only one"
        )
    found = newest_valid_checkpoint(Path(run_dir) / "checkpoints")
    if found is None:
        log.info("resume=auto: no valid checkpoint in %s/checkpoints; starting a new run", run_dir)
        return None
    log.info("resume=auto: resuming from %s (step %d)", found[0], found[1])
    return str(found[0])


def check_folder_of_this_run(run_dir: str | os.PathLike, ckpt_path: str | None) -> None:
    """A run folder belongs to one run: a run that does not continue from a checkpoint of the folder
    itself is refused when the folder already holds checkpoints (its own would land beside them as
    last-v1.ckpt, and a later resume=auto would find the other run's)."""
    folder = Path(run_dir) / "checkpoints"
    existing = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    if not existing or (ckpt_path and Path(ckpt_path).resolve().parent == folder.resolve()):
        return
    raise ValueError(
        f"run folder {run_dir} already holds the checkpoints of a run ({existing[0].name}, "
        f"...); start this run in a new folder (hydra.run.dir=...), or continue that run with "
        f"resume=auto"
    )


def flat_config(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a config's leaves (a list is one leaf)."""
    if not isinstance(node, Mapping):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flat_config(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_differences(stored: Mapping, current: Mapping) -> list[tuple[str, Any, Any]]:
    """(key, stored value, current value) of every key that differs, leaving out
    RESUMABLE_CHANGES."""
    old, new = flat_config(with_current_targets(stored)), flat_config(current)

    def resumable(key: str) -> bool:
        return any(
            fnmatch.fnmatchcase(key, p) or fnmatch.fnmatchcase(key, f"{p}.*")
            for p in RESUMABLE_CHANGES
        )

    return [
        (key, old.get(key, ABSENT), new.get(key, ABSENT))
        for key in sorted(set(old) | set(new))
        if not resumable(key) and old.get(key, ABSENT) != new.get(key, ABSENT)
    ]


def check_same_run(stored: Mapping, current: Mapping, checkpoint: str | os.PathLike) -> None:
    """resume=auto must continue this run, not another run that used the same folder: refuse (one
    line with the first differing keys and both values) when the configs differ beyond
    RESUMABLE_CHANGES."""
    differences = config_differences(stored, current)
    if not differences:
        return
    shown = "; ".join(
        f"{key}: {old!r} in the checkpoint, {new!r} now"
        for key, old, new in differences[:SHOWN_DIFFERENCES]
    )
    more = (
        f" (and {len(differences) - SHOWN_DIFFERENCES} more)"
        if len(differences) > SHOWN_DIFFERENCES
        else ""
    )
    raise ValueError(
        f"resume=auto: {checkpoint} was written by another run ({shown}{more}); start this run in "
        f"another folder (hydra.run.dir=...), or continue that run with these changes: "
        f"resume_allow_changes=true"
    )


def keep_metric_history(loggers, before_step: int, saved_row: dict | None = None) -> None:
    """CSVLogger deletes an existing metrics.csv when it starts; put back its rows of steps before
    the resumed step (and `saved_row`, the checkpointed step's own row, if the file never got it),
    so that the file of a resumed run reads as if the run had never stopped."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            rows = [
                r
                for r in csv.DictReader(f)
                if r.get("step", "").isdigit() and int(r["step"]) < before_step
            ]
        kept = [{k: _number(v) for k, v in row.items() if v not in ("", None)} for row in rows]
        if (
            saved_row
            and saved_row["step"] < before_step
            and not any("train/loss" in row and row["step"] == saved_row["step"] for row in kept)
        ):
            kept.append(dict(saved_row))
        logger.experiment.metrics[:0] = (
            kept  # the writer (created here) removed the file; it rewrites these first
        )


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text
