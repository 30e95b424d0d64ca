"""Counting NaN/inf losses and gradients: each one skips its update; too many in a row stops
the run."""

from __future__ import annotations

import math


class NonFiniteLossError(RuntimeError):
    """The loss (or its gradient) was NaN/inf for `max_in_a_row` steps in a row."""


USUAL_CAUSES = (
    "the usual causes: a learning rate too high for this model (lower optimizer.lr or raise "
    "lr_warmup_steps), float16 overflow (use trainer.precision=bf16-mixed or 32-true), or input "
    "data containing NaN/inf values"
)


class NonFiniteGuard:
    """`check(value, step)` -> whether the update may go ahead; raises NonFiniteLossError after
    `max_in_a_row` non-finite values in a row. `skipped` counts every skipped update of the run."""

    def __init__(self, max_in_a_row: int = 5):
        if max_in_a_row < 1:
            raise ValueError(f"max_nonfinite_in_a_row={max_in_a_row} must be >= 1")
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.skipped = 0

    def check(self, value: float, step: int, what: str = "loss") -> bool:
        if math.isfinite(value):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(
                f"the {what} was {value} for {self.in_a_row} steps in a row (up to step {step}); "
                f"training stopped and the checkpoints written so far are untouched. Check "
                f"{USUAL_CAUSES}; then resume with resume=auto "
                f"(max_nonfinite_in_a_row={self.max_in_a_row} sets the limit)"
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row, self.skipped = int(state.get("in_a_row", 0)), int(state.get("skipped", 0))


def uncount_skipped_step(trainer) -> None:
    """Take back the optimizer step Lightning is about to count for a skipped update, so that a
    skipped update advances neither `global_step` (the run's length, checkpoint names, the
    schedules) nor the learning rate.

    Call it inside `optimizer_step` of an update that was skipped: Lightning marks the step ready
    before that hook and completed after it; both are taken back here, so the completed count stays
    where it was.

    Args:
        trainer: the Lightning trainer running automatic optimization.
    """
    progress = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step
    for tracker in (progress.total, progress.current):
        tracker.ready -= 1
        tracker.completed -= 1
