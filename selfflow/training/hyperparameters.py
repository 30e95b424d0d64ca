"""The run's hyperparameters for every logger: the composed config flattened to dotted keys plus the
command-line overrides as one entry (wandb's run config, TensorBoard's hparams, CSV's hparams.yaml),
and TensorBoard's hparams view given the final metrics at the end of the run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from selfflow.training.resume import flat_config


def command_line_overrides() -> list[str]:
    """The overrides of this run's command line (Hydra's hydra.overrides.task); none outside a
    Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run_hyperparameters(config: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """{dotted key: value} of the resolved run config (a list is one value), and `overrides`: the
    command line's."""
    return {**flat_config(config), "overrides": " ".join(overrides)}


class FinalMetricsInHparams(L.Callback):
    """At the end of training, TensorBoard's hparams view gets the run's hyperparameters with its
    final metrics (the last value of each metric logged through the module, and the last probe), so
    runs of a sweep compare in one table. The other loggers got the hyperparameters at the start
    (Lightning logs the module's hparams)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if value.numel() == 1
        }
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and metrics:
                logger.log_hyperparams(
                    dict(pl_module.hparams), metrics=metrics, step=trainer.global_step
                )
