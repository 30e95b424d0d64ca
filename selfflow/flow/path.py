"""Rectified-flow path in the paper's convention: t = 0 is data, t = 1 is pure noise."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class PathSample:
    """A point on the path: the noised input, the velocity target and the per-token level.

    Attributes:
        x_t: [B, N, C] the noised tokens (1 - t) x0 + t x1.
        target: [B, N, C] the velocity the model regresses, x1 - x0.
        t: [B, N] each token's noise level (0 = data, 1 = noise).
    """

    x_t: Tensor  # [B, N, C]
    target: Tensor  # [B, N, C], x1 - x0
    t: Tensor  # [B, N]


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t x1, with t: [B] (one level per sample) or [B, N] (one per token).

    Args:
        x0: [B, N, C] data.
        x1: [B, N, C] noise.
        t: [B] or [B, N] noise levels, broadcast over the trailing axes.

    Returns:
        [B, N, C] the point of the straight path at level t.
    """
    while t.dim() < x0.dim():
        t = t.unsqueeze(-1)
    return (1 - t) * x0 + t * x1


def velocity_target(x0: Tensor, x1: Tensor) -> Tensor:
    """d x_t / d t along the straight path: x1 - x0.

    Args:
        x0: [B, N, C] data.
        x1: [B, N, C] noise.

    Returns:
        [B, N, C] the velocity, the same at every level.
    """
    return x1 - x0


def sample_path(x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
    """x0, x1: [B, N, C]; t: [B, N] per-token levels.

    Args:
        x0: [B, N, C] data.
        x1: [B, N, C] noise (one draw shared by every view of a sample).
        t: [B, N] per-token noise levels.

    Returns:
        The noised tokens, their velocity target and the levels.
    """
    return PathSample(x_t=interpolate(x0, x1, t), target=velocity_target(x0, x1), t=t)


def clean_estimate(x_t: Tensor, velocity: Tensor, t: Tensor) -> Tensor:
    """x0 implied by a velocity at level t: x0 = x_t - t v.

    Args:
        x_t: [B, N, C] tokens at level t.
        velocity: [B, N, C] the (predicted) velocity there.
        t: [B] or [B, N] noise levels, broadcast over the trailing axes.

    Returns:
        [B, N, C] the data the velocity points back to.
    """
    while t.dim() < x_t.dim():
        t = t.unsqueeze(-1)
    return x_t - t * velocity
