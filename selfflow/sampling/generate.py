"""Generation: noise tokens -> ODE solver over the model's velocity (with optional guidance) -> decoded samples."""
from __future__ import annotations

import torch
from torch import Tensor

from selfflow.flow import solvers
from selfflow.models.transformer import SelfFlowTransformer
from selfflow.tokenizers.base import Tokenizer

SOLVERS = {"euler": solvers.euler}


def guided_velocity(model: SelfFlowTransformer, pos: Tensor, labels: Tensor, modality: str,
                    cfg_scale: float = 1.0, guidance_interval: tuple[float, float] = (0.0, 1.0)):
    """A velocity function v(x, t) for the solvers, with classifier-free guidance inside the level interval.

    Outside the interval, or at scale 1, the model is called once per step on the conditional input only.
    """
    null = torch.full_like(labels, model.null_class)
    lo, hi = guidance_interval

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        level = float(t[0])
        if cfg_scale == 1.0 or not lo <= level <= hi:
            return model.velocity(x, t, pos, labels, modality)
        both = model.velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([pos, pos]),
                              torch.cat([labels, null]), modality)
        cond, uncond = both.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    return velocity


@torch.no_grad()
def generate(model: SelfFlowTransformer, tokenizer: Tokenizer, labels: Tensor, steps: int = 50,
             solver: str = "euler", cfg_scale: float = 1.0, guidance_interval: tuple[float, float] = (0.0, 1.0),
             generator: torch.Generator | None = None, shift: float = 1.0) -> Tensor:
    """Samples for `labels: [B]` (the null label for unconditional ones), decoded by the tokenizer."""
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is unknown; choose one of {sorted(SOLVERS)}")
    device = next(model.parameters()).device
    labels = labels.to(device)
    pos = tokenizer.positions(len(labels), device)
    shape = (len(labels), pos.shape[1], tokenizer.token_channels)
    noise = torch.randn(shape, generator=generator, device="cpu" if generator is None else generator.device)
    velocity = guided_velocity(model, pos, labels, tokenizer.modality, cfg_scale, guidance_interval)
    x0 = SOLVERS[solver](velocity, noise.to(device), steps, shift=shift)
    return tokenizer.decode(x0.float())
