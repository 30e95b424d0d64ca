"""Timestep distributions p(t) on [0, 1] (0 = data, 1 = noise) and the resolution shift."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def shift_levels(t: Tensor, shift: float | Tensor) -> Tensor:
    """Warp levels toward noise for shift > 1: t' = shift t / (1 + (shift - 1) t). Keeps 0 and 1
    fixed.

    Args:
        t: Noise levels in [0, 1], any shape.
        shift: A number, or a tensor broadcast against `t` (one per sample); 1 changes nothing.

    Returns:
        The shifted levels, the shape of `t`.
    """
    if isinstance(shift, (int, float)) and shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(
    num_tokens: int | Tensor,
    base_tokens: int = 256,
    base_shift: float = 1.0,
) -> float | Tensor:
    """Shift that grows with sequence length: sqrt(N / N_base) * base_shift (more tokens need more
    noise).

    Args:
        num_tokens: N, the token count of a sample (or a tensor of them, one per sample).
        base_tokens: N_base, the token count at which the shift is `base_shift`.
        base_shift: The shift at `base_tokens`.

    Returns:
        The shift, a number or a float tensor of the shape of `num_tokens`.
    """
    if isinstance(num_tokens, Tensor):
        return base_shift * torch.sqrt(num_tokens.float() / base_tokens)
    return base_shift * math.sqrt(num_tokens / base_tokens)


class TimestepDistribution:
    """Base: draws levels in [0, 1], then applies the configured shift.

    shift_base_tokens: when set, the shift is per sample and grows with the sample's own token count
    N: `resolution_shift(N, shift_base_tokens, shift)`, i.e. `shift` at N = shift_base_tokens
    (images, clips and recordings of one batch differ a lot in length). None: the same `shift` for
    every sample.

    Args:
        shift: The timestep shift (> 0); above 1 moves levels toward noise.
        shift_base_tokens: Token count at which a per-sample shift is `shift`; None: fixed shift.

    Raises:
        ValueError: `shift` <= 0 or `shift_base_tokens` < 1.
    """

    def __init__(self, shift: float = 1.0, shift_base_tokens: int | None = None):
        if shift <= 0:
            raise ValueError(f"timestep shift must be > 0, got {shift}")
        if shift_base_tokens is not None and shift_base_tokens < 1:
            value = shift_base_tokens
            raise ValueError(
                f"timesteps.shift_base_tokens={value} must be >= 1 (or null for a fixed shift)",
            )
        self.shift, self.shift_base_tokens = shift, shift_base_tokens

    def _draw(self, n: int, generator: torch.Generator | None, device) -> Tensor:
        raise NotImplementedError

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device=None,
        lengths: Tensor | None = None,
    ) -> Tensor:
        """Returns [n] levels in [0, 1]; lengths: [n] token counts of the samples (used by the
        per-sample shift).

        Args:
            n: How many levels (one per sample).
            generator: The random generator to draw from; None for the global one.
            device (torch.device | str | None): Where the levels are made; None: the default device.
            lengths: [n] token counts of the samples; needed when `shift_base_tokens` is set.

        Returns:
            [n] levels in [0, 1], shifted.

        Raises:
            ValueError: The shift depends on the length and `lengths` is None.
        """
        shift = self.shift
        if self.shift_base_tokens is not None:
            if lengths is None:
                raise ValueError(
                    "a length-dependent timestep shift needs each sample's token count (lengths)",
                )
            shift = resolution_shift(lengths.to(device), self.shift_base_tokens, self.shift)
        return shift_levels(self._draw(n, generator, device), shift)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Uniform(TimestepDistribution):
    """t ~ U(0, 1)."""

    def _draw(self, n, generator, device):
        return torch.rand(n, generator=generator, device=device)


class LogitNormal(TimestepDistribution):
    """t = sigmoid(m + s * z), z ~ N(0, 1): concentrates on the middle levels.

    Args:
        mean: m, the mean of the normal before the sigmoid.
        std: s, its standard deviation (> 0).
        shift: The timestep shift (> 0), as for every distribution.
        shift_base_tokens: Token count at which a per-sample shift is `shift`; None: fixed shift.

    Raises:
        ValueError: `std` <= 0 (or a bad shift).
    """

    def __init__(
        self,
        mean: float = 0.0,
        std: float = 1.0,
        shift: float = 1.0,
        shift_base_tokens: int | None = None,
    ):
        super().__init__(shift, shift_base_tokens)
        if std <= 0:
            raise ValueError(f"logit-normal std must be > 0, got {std}")
        self.mean, self.std = mean, std

    def _draw(self, n, generator, device):
        z = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(self.mean + self.std * z)


class ModeSampling(TimestepDistribution):
    """Mode sampling with heavy tails: t = 1 - u - scale (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1).

    scale = 0 is uniform; scale > 0 puts more mass on the middle levels while keeping both ends
    reachable (valid for -1 <= scale <= 2 / (pi - 2), where the map stays monotone).

    Args:
        scale: How much mass moves to the middle levels, in [-1, 2 / (pi - 2)].
        shift: The timestep shift (> 0), as for every distribution.
        shift_base_tokens: Token count at which a per-sample shift is `shift`; None: fixed shift.

    Raises:
        ValueError: `scale` outside [-1, 2 / (pi - 2)] (or a bad shift).
    """

    def __init__(
        self,
        scale: float = 1.29,
        shift: float = 1.0,
        shift_base_tokens: int | None = None,
    ):
        super().__init__(shift, shift_base_tokens)
        if not -1.0 <= scale <= 2.0 / (math.pi - 2.0):
            raise ValueError(
                f"mode-sampling scale={scale} must be in [-1, {2.0 / (math.pi - 2.0):.3f}]",
            )
        self.scale = scale

    def _draw(self, n, generator, device):
        u = torch.rand(n, generator=generator, device=device)
        return (1 - u - self.scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)).clamp(0, 1)
