"""When checkpoints are written: Lightning's ModelCheckpoint, plus a save at the end of training and a flush of
the loggers with every save, so that a resumed run has the full metric history up to its checkpoint."""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


def flush_loggers(trainer) -> None:
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.save()


def pending_metrics_row(trainer) -> dict[str, float] | None:
    """The logger row of the step being checkpointed: Lightning hands it to the loggers only after this save, so
    a kill right after the save would lose it; the checkpoint keeps a copy (`keep_metric_history` puts it back)."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None or not connector.should_update_logs:
        return None
    fresh = getattr(trainer.lightning_module, "STEP_METRICS", ())  # logged before this save (others are stale)
    row = {name: float(value) for name, value in trainer.callback_metrics.items() if name in fresh}
    step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step - 1)
    return {**row, "epoch": trainer.current_epoch, "step": int(step)} if row else None


class SelfFlowCheckpoint(ModelCheckpoint):
    """Every `every_n_train_steps` steps and at the end of training (files written atomically by the run's
    AtomicCheckpointIO), except while the loss is NaN/inf."""

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
        self._flush_at_next_batch = True  # the metrics of the saved step reach the logger after this hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._flush_at_next_batch:
            self._flush_at_next_batch = False
            flush_loggers(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["selfflow_step_metrics"] = pending_metrics_row(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_global_step_saved and self._every_n_train_steps:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
