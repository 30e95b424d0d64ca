"""Training progress: on a terminal Lightning's rich bar, labelled by optimizer step ("step
1300/3000"), since every selfflow run is step-based (Lightning's own label would read "Epoch 130/-2"
with max_epochs=-1); without one (a batch job, a SLURM log, a pipe) a text line every N steps, which
a log file can hold and a person can read."""

from __future__ import annotations

import datetime
import logging
import sys
import time

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

log = logging.getLogger("selfflow")

# (metric, label) of a text progress line, in order; a metric not logged yet is left out
TEXT_METRICS = (
    ("train/loss", "loss"),
    ("train/loss_flow", "loss_flow"),
    ("train/loss_rep", "loss_rep"),
)


def step_progress(every_n_steps: int | None = None, terminal: bool | None = None) -> ProgressBar:
    """The progress display for where stdout goes: the rich bar on a terminal, text lines
    every `every_n_steps` steps (None: trainer.log_every_n_steps) otherwise. terminal: None
    asks stdout."""
    if terminal is None:
        terminal = sys.stdout.isatty()
    return StepProgressBar() if terminal else TextProgress(every_n_steps)


class StepProgressBar(RichProgressBar):
    """RichProgressBar whose label counts optimizer steps (and the epoch over the data) instead
    of epochs."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_steps is None or trainer.max_steps < 0:
            return super()._get_train_description(current_epoch)
        return f"step {trainer.global_step}/{trainer.max_steps} (epoch {current_epoch})"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        task = getattr(self, "train_progress_bar_id", None)
        if self.progress is not None and task is not None and not self.is_disabled:
            self.progress.update(
                task, description=self._get_train_description(trainer.current_epoch)
            )


class TextProgress(ProgressBar):
    """One log line every `every_n_steps` optimizer steps and at the last step (rank 0), through the
    `selfflow` logger (Hydra writes it to train.log and stdout): `step 300/3000 (10.0%) | loss
    0.5123 | loss_flow 0.4012 | loss_rep 0.1389 | 1.2e+04 tokens/s | ETA 0:04:12`."""

    def __init__(self, every_n_steps: int | None = None):
        super().__init__()
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ValueError(
                f"callbacks.progress.every_n_steps={every_n_steps!r} must be an integer >= 1 (or "
                f"null: trainer.log_every_n_steps)"
            )
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._start: tuple[int, float] | None = (
            None  # (step, time) when this process began training
        )
        self._last_line_step = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = (trainer.global_step, time.perf_counter())

    # a step's metrics reach trainer.callback_metrics after its on_train_batch_end hooks: its line
    # is written when the next step starts (or the epoch or run ends)
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._report(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._report(trainer)

    def _report(self, trainer) -> None:
        """The line of the last completed step, if it is due and not written yet."""
        step, last = trainer.global_step, trainer.max_steps
        every = self.every_n_steps or max(1, trainer.log_every_n_steps)
        due = step % every == 0 or (0 < last <= step)
        if not (
            self._enabled
            and trainer.is_global_zero
            and due
            and step > 0
            and step != self._last_line_step
        ):
            return
        self._last_line_step = step
        log.info(self.line(step, last, {k: float(v) for k, v in trainer.callback_metrics.items()}))

    def line(self, step: int, max_steps: int, metrics: dict[str, float]) -> str:
        """The text of one progress line at `step` from the latest logged `metrics`."""
        parts = [
            f"step {step}/{max_steps} ({100 * step / max_steps:.1f}%)"
            if max_steps > 0
            else f"step {step}"
        ]
        parts += [f"{label} {metrics[key]:.4f}" for key, label in TEXT_METRICS if key in metrics]
        if "train/tokens_per_s" in metrics:
            parts.append(f"{metrics['train/tokens_per_s']:.3g} tokens/s")
        if self._start is not None and max_steps > 0 and step > self._start[0]:
            seconds_per_step = (time.perf_counter() - self._start[1]) / (step - self._start[0])
            parts.append(
                f"ETA {datetime.timedelta(seconds=round(seconds_per_step * (max_steps - step)))}"
            )
        return " | ".join(parts)
