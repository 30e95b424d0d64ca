"""The training progress bar: Lightning's rich bar, labelled by optimizer step ("step 1300/3000"), since every
selfflow run is step-based (Lightning's own label would read "Epoch 130/-2" with max_epochs=-1)."""
from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """RichProgressBar whose label counts optimizer steps (and the epoch over the data) instead of epochs."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_steps is None or trainer.max_steps < 0:
            return super()._get_train_description(current_epoch)
        return f"step {trainer.global_step}/{trainer.max_steps} (epoch {current_epoch})"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        task = getattr(self, "train_progress_bar_id", None)
        if self.progress is not None and task is not None and not self.is_disabled:
            self.progress.update(task, description=self._get_train_description(trainer.current_epoch))
