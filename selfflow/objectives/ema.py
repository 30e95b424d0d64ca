"""Exponential moving average of a model: the Self-Flow teacher and the weights used for
inference."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Holds `module`, an EMA copy of a model, updated with `update(model)` after every optimizer
    step.

    Args:
        model: The model to copy; the copy is frozen and kept in eval mode.
        decay: The target decay in [0, 1) (0.9999 at full scale over millions of steps; shorter runs
            need a shorter horizon).
        warmup: Use min(decay, (1 + n) / (10 + n)) at update n, so early updates move the copy
            quickly.
        key: The config key that sets `decay` (named in errors).

    Raises:
        ValueError: `decay` outside [0, 1).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        warmup: bool = True,
        key: str = "objective.ema_decay",
    ):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"{key}={decay} must be in [0, 1)")
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        """The decay the next update uses (lower during the warm-up).

        Returns:
            min(decay, (1 + n) / (10 + n)) after n updates with warm-up, else `decay`.
        """
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def train(self, mode: bool = True):  # the copy stays in eval mode
        """Set this module's training flag while the copy stays in eval mode; returns this module.

        Args:
            mode: The training flag of this module.
        """
        super().train(mode)
        self.module.eval()
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the copy toward `model`'s weights by one EMA step and copy its buffers.

        Args:
            model: The trained model, with the same parameter list as the copy.

        Raises:
            RuntimeError: The model's parameters do not match the copy's.
        """
        decay = self.current_decay()
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise RuntimeError("EMA copy and model have different parameter lists")
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
        self.num_updates += 1
