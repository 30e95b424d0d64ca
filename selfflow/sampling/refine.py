"""Refinement (image-to-image and the like): sampling that starts from an existing sample noised to
a level.

With `strength` s in [0, 1], the sample's tokens x0 become x_s = (1 - s) x0 + s x1 and the ODE runs
from level s down to 0: s = 0 returns the input untouched, s = 1 starts from pure noise and ignores
it (plain generation from the same noise). The solvers integrate from 1 to 0, so they run on the
rescaled time tau = t / s, where the velocity is s * v(x, s tau): every ODE solver of
`selfflow.flow.solvers` works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from selfflow.flow import solvers
from selfflow.sampling.generate import (
    Generation,
    GuidedVelocity,
    NoiseSource,
    autocast_dtype,
    model_device,
)
from selfflow.tokenizers.base import Tokenizer
from selfflow.tokens import Condition


def check_strength(strength: float) -> float:
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength={strength} must be in [0, 1] (0 keeps the input, 1 ignores it)")
    return float(strength)


@torch.no_grad()
def refine_tokens(
    model,
    tokenizer: Tokenizer,
    init: Tensor,
    strength: float,
    condition: Condition,
    steps: int = 50,
    solver: str = "euler",
    cfg_scale: float = 1.0,
    guidance_interval: Sequence[float] = (0.0, 1.0),
    noise: NoiseSource | None = None,
    shift: float = 1.0,
    precision: str = "fp32",
    on_evaluation: Callable[[], None] | None = None,
) -> Generation:
    """Refined tokens for raw samples `init` (what `tokenizer.encode` takes, B of them) and
    their `condition`.

    `steps` model evaluations cover the part of the path from `strength` to 0.
    """
    strength = check_strength(strength)
    if solver in solvers.STOCHASTIC or solver not in solvers.SOLVERS:
        raise ValueError(
            f"refinement runs an ODE from the chosen level: sampler={solver!r} cannot be "
            f"used; choose euler or heun"
        )
    device = model_device(model)
    x0 = tokenizer.encode(init.to(device)).x.float()  # [B, N, C]
    if strength == 0.0:
        return Generation(x0, 0, 0)
    noise = noise or NoiseSource()
    x1 = noise(tuple(x0.shape), device)
    start = (1 - strength) * x0 + strength * x1
    pos = tokenizer.positions(x0.shape[0], device)
    velocity = GuidedVelocity(
        model,
        pos,
        condition.to(device),
        tokenizer.modality,
        cfg_scale,
        guidance_interval,
        autocast_dtype(device, precision),
        on_evaluation,
    )

    def rescaled(x: Tensor, tau: Tensor) -> Tensor:  # d x / d tau at level t = strength * tau
        return strength * velocity(x, strength * tau)

    out = solvers.SOLVERS[solver](rescaled, start, steps, shift=shift)
    return Generation(out.float(), velocity.evaluations, velocity.model_calls)
