"""The learning rate in metrics.csv once per optimizer step."""
from __future__ import annotations

from lightning.pytorch.callbacks import LearningRateMonitor


class StepLearningRateMonitor(LearningRateMonitor):
    """Lightning's LearningRateMonitor, logging at the first micro-batch of each optimizer step only: the stock one
    logs at every micro-batch, so with gradient accumulation each step's learning rate was written several times."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
