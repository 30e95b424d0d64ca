"""When checkpoints are written: Lightning's ModelCheckpoint, plus a save at the end of training
(before the end-of-run samples) and a flush of the loggers with every save, so that a resumed run
has the full metric history up to its checkpoint. The file paths a resumed checkpoint names are
checked before Lightning may delete them."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger("selfflow")


def flush_loggers(trainer) -> None:
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.save()


def pending_metrics_row(trainer) -> dict[str, float] | None:
    """The logger row of the step being checkpointed: Lightning hands it to the loggers only after
    this save, so a kill right after the save would lose it; the checkpoint keeps a copy
    (`keep_metric_history` puts it back)."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None or not connector.should_update_logs:
        return None
    fresh = getattr(
        trainer.lightning_module, "STEP_METRICS", ()
    )  # logged before this save (others are stale)
    row = {name: float(value) for name, value in trainer.callback_metrics.items() if name in fresh}
    step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step - 1)
    return {**row, "epoch": trainer.current_epoch, "step": int(step)} if row else None


class SelfFlowCheckpoint(ModelCheckpoint):
    """Every `every_n_train_steps` steps and at the end of training (files written atomically by the
    run's AtomicCheckpointIO), except while the loss is NaN/inf."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._flush_at_next_batch = False

    def _should_skip_saving_checkpoint(self, trainer) -> bool:
        """No saves during a run of NaN/inf steps: the last good checkpoint stays the newest."""
        guard = getattr(trainer.lightning_module, "nonfinite", None)
        return super()._should_skip_saving_checkpoint(trainer) or bool(guard and guard.in_a_row)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        flush_loggers(trainer)
        super()._save_checkpoint(trainer, filepath)
        self._flush_at_next_batch = (
            True  # the metrics of the saved step reach the logger after this hook
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._flush_at_next_batch:
            self._flush_at_next_batch = False
            flush_loggers(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["selfflow_step_metrics"] = pending_metrics_row(trainer)

    def save_end_of_run(self, trainer) -> None:
        """The checkpoint of the last step, unless that step is saved already (every rank
        calls it)."""
        if trainer.global_step != self._last_global_step_saved and self._every_n_train_steps:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save_end_of_run(trainer)
        super().on_train_end(trainer, pl_module)

    def holds(self, path) -> bool:
        """Whether `path` is a real file directly inside this run's checkpoint folder
        (links resolved)."""
        if not isinstance(path, str) or not path or self.dirpath is None:
            return False
        try:
            resolved = Path(path).resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a link loop
            return False
        return resolved.parent == Path(self.dirpath).resolve() and resolved.is_file()

    def load_state_dict(self, state_dict) -> None:
        """Lightning's restore, keeping only the paths that are real files inside this run's
        checkpoint folder: Lightning later deletes the "previous" best/last files named here, and
        its own check lets a crafted `<dirpath>/../../x` through. The others are forgotten (never
        deleted), with a warning."""
        super().load_state_dict(state_dict)
        named = [
            self.best_model_path,
            self.kth_best_model_path,
            self.last_model_path,
            *self.best_k_models,
        ]
        foreign = sorted({str(p) for p in named if p and not self.holds(p)})
        if not foreign and all(isinstance(s, torch.Tensor) for s in self.best_k_models.values()):
            return
        if foreign:
            log.warning(
                "the resumed checkpoint names files outside %s (%s); they "
                "are forgotten, never deleted",
                self.dirpath,
                ", ".join(foreign[:3]),
            )
        self.best_k_models = {
            p: s
            for p, s in self.best_k_models.items()
            if self.holds(p) and isinstance(s, torch.Tensor)
        }
        if not self.holds(
            self.last_model_path
        ):  # the run's own last.ckpt, if any, is overwritten in place
            own_last = str(
                Path(self.dirpath or "") / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            )
            self.last_model_path = own_last if self.holds(own_last) else ""
        best, worst = (min, max) if self.mode == "min" else (max, min)
        kept = self.best_k_models
        self.best_model_path = best(kept, key=kept.get) if kept else ""
        self.best_model_score = kept[self.best_model_path] if kept else None
        if kept and len(kept) == self.save_top_k:
            self.kth_best_model_path = worst(kept, key=kept.get)
            self.kth_value = kept[self.kth_best_model_path]
        else:  # fewer than k kept: the next saves fill the top k before any is replaced
            self.kth_best_model_path = ""
            self.kth_value = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)

    def _should_remove_checkpoint(self, trainer, previous: str, current: str) -> bool:
        """Lightning's rule, and only ever a file of this run's checkpoint folder."""
        return super()._should_remove_checkpoint(trainer, previous, current) and self.holds(
            previous
        )


def save_end_of_run(trainer) -> None:
    """Write the end-of-run checkpoints now (callbacks that work at the end, such as the sample
    grids, call this first, so that a failure there leaves the run's final checkpoint behind)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, SelfFlowCheckpoint):
            callback.save_end_of_run(trainer)
