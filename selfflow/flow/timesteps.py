"""Timestep distributions p(t) on [0, 1] (0 = data, 1 = noise) and the resolution shift."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def shift_levels(t: Tensor, shift: float | Tensor) -> Tensor:
    """Warp levels toward noise for shift > 1: t' = shift t / (1 + (shift - 1) t). Keeps 0 and 1 fixed."""
    if isinstance(shift, (int, float)) and shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int | Tensor, base_tokens: int = 256, base_shift: float = 1.0) -> float | Tensor:
    """Shift that grows with sequence length: sqrt(N / N_base) * base_shift (more tokens need more noise)."""
    if isinstance(num_tokens, Tensor):
        return base_shift * torch.sqrt(num_tokens.float() / base_tokens)
    return base_shift * math.sqrt(num_tokens / base_tokens)


class TimestepDistribution:
    """Base: draws levels in [0, 1], then applies the configured shift."""

    def __init__(self, shift: float = 1.0):
        if shift <= 0:
            raise ValueError(f"timestep shift must be > 0, got {shift}")
        self.shift = shift

    def _draw(self, n: int, generator: torch.Generator | None, device) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Returns [n] levels in [0, 1]."""
        return shift_levels(self._draw(n, generator, device), self.shift)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Uniform(TimestepDistribution):
    """t ~ U(0, 1)."""

    def _draw(self, n, generator, device):
        return torch.rand(n, generator=generator, device=device)


class LogitNormal(TimestepDistribution):
    """t = sigmoid(m + s * z), z ~ N(0, 1): concentrates on the middle levels."""

    def __init__(self, mean: float = 0.0, std: float = 1.0, shift: float = 1.0):
        super().__init__(shift)
        if std <= 0:
            raise ValueError(f"logit-normal std must be > 0, got {std}")
        self.mean, self.std = mean, std

    def _draw(self, n, generator, device):
        z = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(self.mean + self.std * z)
