"""Learning-rate schedules (`lr_schedule=constant|cosine|linear`): a pure function of the optimizer
step, so that a resumed run continues with exactly the learning rate an uninterrupted run would
have had."""

from __future__ import annotations

import math
from collections.abc import Callable

# the decay after the warm-up, as a function of progress p in [0, 1] (0: end of
# warm-up, 1: decay_steps)
DECAYS: dict[str, Callable[[float], float]] = {
    "constant": lambda p: 1.0,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "linear": lambda p: 1.0 - p,
}


class LRSchedule:
    """The learning rate at each optimizer step, as a factor of the optimizer's lr (what LambdaLR
    multiplies by).

    Linear warm-up: (step + 1) / (warmup_steps + 1) of the lr for the first `warmup_steps` steps;
    then `shape`: constant, or cosine / linear decay from the lr down to `min_lr` at step
    `decay_steps` (counted from the start, warm-up included; the run's trainer.max_steps in the
    configs), min_lr after that.
    """

    def __init__(
        self,
        shape: str = "constant",
        warmup_steps: int = 0,
        min_lr: float = 0.0,
        decay_steps: int | None = None,
    ):
        if shape not in DECAYS:
            raise ValueError(
                f"lr_schedule.shape={shape!r} is unknown; choose one of: {', '.join(DECAYS)}"
            )
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(
                f"lr_schedule.warmup_steps={warmup_steps!r} must be an integer >= 0 "
                f"(lr_warmup_steps sets it too)"
            )
        if isinstance(min_lr, bool) or not isinstance(min_lr, (int, float)) or min_lr < 0:
            raise ValueError(f"lr_schedule.min_lr={min_lr!r} must be a number >= 0")
        if shape != "constant" and (decay_steps is None or decay_steps <= warmup_steps):
            raise ValueError(
                f"lr_schedule={shape} decays until lr_schedule.decay_steps={decay_steps}, which "
                f"must be above lr_schedule.warmup_steps={warmup_steps}; set trainer.max_steps "
                f"(the default) or lr_schedule.decay_steps"
            )
        self.shape, self.warmup_steps, self.min_lr, self.decay_steps = (
            shape,
            warmup_steps,
            float(min_lr),
            decay_steps,
        )

    def factor(self, step: int, base_lr: float) -> float:
        """lr at optimizer step `step` (0-based) divided by `base_lr`."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.shape == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps))
        floor = self.min_lr / base_lr
        return floor + (1.0 - floor) * DECAYS[self.shape](progress)

    def check_base_lr(self, base_lr: float) -> None:
        if self.shape != "constant" and self.min_lr > base_lr:
            raise ValueError(
                f"lr_schedule.min_lr={self.min_lr} is above optimizer.lr={base_lr}; a decay ends "
                f"below the lr it starts from: lower lr_schedule.min_lr"
            )
