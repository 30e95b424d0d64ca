"""ODE solvers from noise (t = 1) to data (t = 0). A velocity function is `v(x: [B, ...], t: [B]) -> [B, ...]`."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from selfflow.flow.timesteps import shift_levels

VelocityFn = Callable[[Tensor, Tensor], Tensor]


def time_grid(steps: int, shift: float = 1.0, device=None) -> Tensor:
    """[steps + 1] levels from 1 down to 0, optionally warped toward noise by `shift`."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_levels(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64), shift)


def euler(velocity: VelocityFn, x1: Tensor, steps: int, shift: float = 1.0) -> Tensor:
    """Explicit Euler: one model evaluation per step (NFE = steps)."""
    grid = time_grid(steps, shift, x1.device)
    x = x1
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        t = torch.full((x.shape[0],), float(t_cur), device=x.device, dtype=x.dtype)
        x = x + (t_next - t_cur).to(x.dtype) * velocity(x, t)
    return x
