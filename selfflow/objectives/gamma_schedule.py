"""The weight of the representation loss over training (`objective.gamma_schedule`): a pure function
of the optimizer step, so that a resumed run continues with exactly the weights an uninterrupted run
would have had."""

from __future__ import annotations

from collections.abc import Callable

# the factor of objective.gamma at optimizer step `step`, given the schedule's `steps`
KINDS: dict[str, Callable[[int, int], float]] = {
    "constant": lambda step, steps: 1.0,
    # 0 at step 0, the full gamma from `steps` on
    "warmup": lambda step, steps: min(1.0, step / steps),
    # the full gamma, then 0 from `steps` on
    "cutoff": lambda step, steps: 1.0 if step < steps else 0.0,
}


class GammaSchedule:
    """kind: constant (gamma throughout), warmup (rising linearly from 0 at step 0 to gamma at
    `steps`) or cutoff (gamma before `steps`, 0 from then on: the representation loss is still
    computed and logged, with weight 0).

    Calling the schedule with an optimizer step gives the factor of gamma there.

    Args:
        kind: `constant`, `warmup` or `cutoff`.
        steps: Where the warm-up ends or the cut-off begins (>= 1 unless constant).

    Raises:
        ValueError: An unknown kind, or `steps` not a whole number >= 1 for warmup and cutoff.
    """

    def __init__(self, kind: str = "constant", steps: int = 0):
        if kind not in KINDS:
            choices = ", ".join(KINDS)
            raise ValueError(
                f"objective.gamma_schedule.kind={kind!r} is unknown; choose one of: {choices}",
            )
        whole = not isinstance(steps, bool) and isinstance(steps, int) and steps >= 0
        if not whole or (kind != "constant" and steps < 1):
            raise ValueError(
                f"objective.gamma_schedule.steps={steps!r} must be an integer >= 1 with "
                f"kind={kind} (the step where the warm-up ends or the cut-off begins)"
            )
        self.kind, self.steps = kind, steps

    def __call__(self, step: int) -> float:
        """The factor of gamma at optimizer step `step` (0-based).

        Args:
            step: The optimizer step.

        Returns:
            The factor in [0, 1].
        """
        return KINDS[self.kind](step, self.steps)
