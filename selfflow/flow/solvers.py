"""Solvers from noise (t = 1) to data (t = 0) in the paper's convention, x_t = (1 - t) x0 + t x1.

A velocity function is `v(x: [B, ...], t: [B]) -> [B, ...]` (d x_t / d t). Every solver calls it
exactly `steps` times, so that samplers compare at equal cost (NFE = steps):
- `euler`: `steps` Euler steps.
- `heun`: ceil(steps / 2) intervals of Heun's method (2 evaluations each); when `steps` is odd the
  first interval (at the noise end, where paths are straightest) is a plain Euler step (1
  evaluation).
- `euler_maruyama`: the SDE of the released Self-Flow sampler (SiT's transport sampler:
  Euler-Maruyama, diffusion proportional to the noise level, last step "Mean"): `steps - 1`
  stochastic steps on levels from 1 down to `last_step`, then one step from `last_step` to 0 along
  the SDE's drift without noise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from selfflow.flow.timesteps import shift_levels

VelocityFn = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[Tensor], Tensor]  # x -> standard normal noise shaped like x
SDE_LAST_STEPS = ("mean", "euler")  # the SDE's drift (the released sampler), or the velocity alone


def time_grid(steps: int, shift: float = 1.0, device=None) -> Tensor:
    """[steps + 1] levels from 1 down to 0, optionally warped toward noise by `shift`.

    Args:
        steps: Intervals of the grid (>= 1).
        shift: Warps the levels toward noise for shift > 1 (1 leaves them evenly spaced).
        device (torch.device | str | None): Where the grid is made; None for the default device.

    Returns:
        [steps + 1] float64 levels, 1 first and 0 last.

    Raises:
        ValueError: `steps` < 1.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_levels(
        torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64),
        shift,
    )


def _levels(t: Tensor, x: Tensor) -> Tensor:
    """One scalar level broadcast to the batch: [B] in x's dtype."""
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)


def euler(velocity: VelocityFn, x1: Tensor, steps: int, shift: float = 1.0) -> Tensor:
    """Explicit Euler: one model evaluation per step (NFE = steps).

    Args:
        velocity: The model as `v(x: [B, ...], t: [B]) -> [B, ...]`, the velocity d x_t / d t.
        x1: [B, ...] pure noise, the start at t = 1.
        steps: Model evaluations (NFE).
        shift: Warps the levels toward noise for shift > 1 (1 leaves them evenly spaced).

    Returns:
        [B, ...] the sample at t = 0.
    """
    grid = time_grid(steps, shift, x1.device)
    x = x1
    for t_cur, t_next in itertools.pairwise(grid):
        x = x + float(t_next - t_cur) * velocity(x, _levels(t_cur, x))
    return x


def heun(velocity: VelocityFn, x1: Tensor, steps: int, shift: float = 1.0) -> Tensor:
    """Heun's second-order method with NFE = steps: ceil(steps / 2) intervals, the first one Euler
    if steps is odd.

    Args:
        velocity: The model as `v(x: [B, ...], t: [B]) -> [B, ...]`, the velocity d x_t / d t.
        x1: [B, ...] pure noise, the start at t = 1.
        steps: Model evaluations (NFE).
        shift: Warps the levels toward noise for shift > 1 (1 leaves them evenly spaced).

    Returns:
        [B, ...] the sample at t = 0.

    Raises:
        ValueError: `steps` < 1.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    intervals = math.ceil(steps / 2)
    grid = time_grid(intervals, shift, x1.device)
    x = x1
    for i, (t_cur, t_next) in enumerate(itertools.pairwise(grid)):
        h = float(t_next - t_cur)
        v_cur = velocity(x, _levels(t_cur, x))
        x_euler = x + h * v_cur
        if i == 0 and steps % 2:
            x = x_euler
        else:
            x = x + h * 0.5 * (v_cur + velocity(x_euler, _levels(t_next, x)))
    return x


def score_from_velocity(velocity: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """Score grad log p_t(x) implied by the velocity on the linear path: -(x + (1 - t) v) / t.

    From x = (1 - t) x0 + t x1 and v = x1 - x0: E[x1 | x] = x + (1 - t) v, and the score is -E[x1 |
    x] / t.

    Args:
        velocity: [B, ...] the velocity at (x, t).
        x: [B, ...] the point at level t.
        t: [B] noise levels, > 0.

    Returns:
        [B, ...] the score at (x, t).
    """
    t = t.reshape(-1, *([1] * (x.dim() - 1)))
    return -(x + (1 - t) * velocity) / t


def euler_maruyama(
    velocity: VelocityFn,
    x1: Tensor,
    steps: int,
    shift: float = 1.0,
    noise: NoiseFn | None = None,
    last_step: float = 0.04,
    diffusion_norm: float = 1.0,
    last_step_mode: str = "mean",
) -> Tensor:
    """Euler-Maruyama on the reverse SDE with the ODE's marginals (the released sampler, NFE =
    steps).

    Going from level t to t - h: x <- x - h (v - w s) + sqrt(2 w h) z, with s the score from the
    velocity and diffusion w = diffusion_norm * t (proportional to the noise level). The levels run
    from 1 to `last_step` in `steps - 1` stochastic steps; the final step goes from `last_step` to 0
    without noise, along the same drift v - w s (last_step_mode="mean", the released sampler's
    "Mean" step) or along the velocity alone ("euler").

    Args:
        velocity: The model as `v(x: [B, ...], t: [B]) -> [B, ...]`, the velocity d x_t / d t.
        x1: [B, ...] pure noise, the start at t = 1.
        steps: Model evaluations (NFE, >= 2): `steps - 1` stochastic steps and the last step.
        shift: Warps the levels toward noise for shift > 1 (1 leaves them evenly spaced).
        noise: `x -> z`, standard normal noise shaped like x; None for `torch.randn_like`.
        last_step: The level in (0, 1) where the stochastic steps end.
        diffusion_norm: Scales the diffusion w = diffusion_norm * t.
        last_step_mode: `mean` (the SDE's drift, as the released sampler) or `euler` (the velocity).

    Returns:
        [B, ...] the sample at t = 0.

    Raises:
        ValueError: `steps` < 2, `last_step` outside (0, 1) or an unknown `last_step_mode`.
    """
    if steps < 2:
        detail = "steps - 1 stochastic steps and a last step"
        raise ValueError(f"the sde sampler needs steps >= 2 ({detail}), got {steps}")
    if not 0.0 < last_step < 1.0:
        raise ValueError(f"sde last_step={last_step} must be in (0, 1)")
    if last_step_mode not in SDE_LAST_STEPS:
        raise ValueError(
            f"sde_last_step_mode={last_step_mode!r} is unknown; choose one of {SDE_LAST_STEPS}",
        )
    noise = noise or torch.randn_like
    levels = torch.linspace(1.0, last_step, steps, device=x1.device, dtype=torch.float64)
    grid = shift_levels(levels, shift)

    def drift(x: Tensor, t_cur: Tensor, with_score: bool = True) -> Tensor:
        """d x / d t of the reverse SDE at level t_cur (the steps go toward smaller t)."""
        t = _levels(t_cur, x)
        v = velocity(x, t)
        return v - diffusion_norm * float(t_cur) * score_from_velocity(v, x, t) if with_score else v

    x = x1
    for t_cur, t_next in itertools.pairwise(grid):
        h, w = float(t_cur - t_next), diffusion_norm * float(t_cur)
        x = x - h * drift(x, t_cur) + math.sqrt(2 * w * h) * noise(x)
    t_last = grid[-1]
    return x - float(t_last) * drift(x, t_last, with_score=last_step_mode == "mean")


SOLVERS: dict[str, Callable[..., Tensor]] = {"euler": euler, "heun": heun, "sde": euler_maruyama}
STOCHASTIC = ("sde",)
