"""The learning rate in metrics.csv once per optimizer step."""

from __future__ import annotations

from lightning.pytorch.callbacks import LearningRateMonitor


class StepLearningRateMonitor(LearningRateMonitor):
    """Lightning's LearningRateMonitor, logging at the first micro-batch of each optimizer step
    only (the stock one logs at every micro-batch, so with gradient accumulation each step's
    learning rate was written several times), and always at the run's last step, as SelfFlowModule
    logs its metrics there (a run shorter than log_every_n_steps would otherwise log no learning
    rate at all)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches:
            return
        if (
            not 0 < trainer.max_steps <= trainer.global_step + 1
            or trainer._logger_connector.should_update_logs
        ):
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            return
        stats = self._extract_stats(trainer, "step" if self.logging_interval is None else "any")
        for logger in trainer.loggers:  # as the stock monitor does on a logging step
            logger.log_metrics(stats, step=trainer.fit_loop.epoch_loop._batches_that_stepped)
