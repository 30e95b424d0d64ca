"""Rectified-flow path in the paper's convention: t = 0 is data, t = 1 is pure noise."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class PathSample:
    """A point on the path: the noised input, the velocity target and the per-token level."""

    x_t: Tensor  # [B, N, C]
    target: Tensor  # [B, N, C], x1 - x0
    t: Tensor  # [B, N]


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t x1, with t: [B] (one level per sample) or [B, N] (one per token)."""
    while t.dim() < x0.dim():
        t = t.unsqueeze(-1)
    return (1 - t) * x0 + t * x1


def velocity_target(x0: Tensor, x1: Tensor) -> Tensor:
    """d x_t / d t along the straight path: x1 - x0."""
    return x1 - x0


def sample_path(x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
    """x0, x1: [B, N, C]; t: [B, N] per-token levels."""
    return PathSample(x_t=interpolate(x0, x1, t), target=velocity_target(x0, x1), t=t)


def clean_estimate(x_t: Tensor, velocity: Tensor, t: Tensor) -> Tensor:
    """x0 implied by a velocity at level t: x0 = x_t - t v."""
    while t.dim() < x_t.dim():
        t = t.unsqueeze(-1)
    return x_t - t * velocity
