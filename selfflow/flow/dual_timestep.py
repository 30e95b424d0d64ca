"""Dual-timestep scheduling: two iid levels per sample, spread over its tokens by a random mask."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from selfflow.flow.timesteps import TimestepDistribution, Uniform

MASK_MODES = ("exact", "bernoulli")


@dataclass
class DualLevels:
    """Per-sample levels and how they map onto tokens.

    The student sees token n of sample b at `levels[b, index[b, n]]`; the teacher sees every token at
    `teacher_levels[b]` = min(t, s), the cleaner of the two.
    """

    levels: Tensor  # [B, 2]: (t, s), unsorted
    index: Tensor  # [B, N] long: 0 where the token takes t, 1 where it is masked and takes s
    mask: Tensor  # [B, N] bool: the masked set M
    teacher_levels: Tensor  # [B]

    @property
    def per_token(self) -> Tensor:
        """[B, N] student level of every token."""
        return torch.gather(self.levels, 1, self.index)


def check_mask_ratio(ratio: float, name: str = "objective.mask_ratio") -> float:
    if not 0.0 <= ratio <= 0.5:
        raise ValueError(
            f"{name}={ratio} is out of range: the masked group must be the smaller one, so use a value in "
            f"[0, 0.5] (0 = vanilla flow matching; method defaults: image 0.25, video 0.10, audio 0.50)"
        )
    return float(ratio)


class DualTimestepScheduler:
    """Draws (t, s) iid from p(t), never sorted, and a token mask of ratio r <= 0.5.

    mask_mode="exact": exactly round(r * n_valid) tokens per sample via a random permutation;
    mask_mode="bernoulli": each token independently with probability r.
    """

    def __init__(self, mask_ratio: float, timesteps: TimestepDistribution | None = None, mask_mode: str = "exact"):
        self.mask_ratio = check_mask_ratio(mask_ratio)
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode={mask_mode!r} is unknown; choose one of {MASK_MODES}")
        self.mask_mode = mask_mode
        self.timesteps = timesteps or Uniform()

    def draw_mask(self, batch: int, tokens: int, valid: Tensor | None = None,
                  generator: torch.Generator | None = None, device=None) -> Tensor:
        """[B, N] bool mask. valid: [B, N] bool, False on padding (never masked, not counted)."""
        if valid is None:
            valid = torch.ones(batch, tokens, dtype=torch.bool, device=device)
        if self.mask_ratio == 0:
            return torch.zeros(batch, tokens, dtype=torch.bool, device=device)
        scores = torch.rand(batch, tokens, generator=generator, device=device)
        if self.mask_mode == "bernoulli":
            return (scores < self.mask_ratio) & valid
        # exact count: the k lowest random scores among the valid tokens form a uniformly random subset
        scores = scores.masked_fill(~valid, 2.0)
        ranks = scores.argsort(dim=1).argsort(dim=1)  # [B, N] rank of each token's score
        counts = torch.round(valid.sum(dim=1).float() * self.mask_ratio).long()  # [B]
        return ranks < counts[:, None]

    def __call__(self, batch: int, tokens: int, valid: Tensor | None = None,
                 generator: torch.Generator | None = None, device=None) -> DualLevels:
        t = self.timesteps.sample(batch, generator, device)
        s = self.timesteps.sample(batch, generator, device)
        levels = torch.stack([t, s], dim=1)  # [B, 2] -- deliberately not sorted
        mask = self.draw_mask(batch, tokens, valid, generator, device)
        # the teacher's view is the cleaner of the levels in use: s only counts where some token took it
        teacher = torch.where(mask.any(dim=1), torch.minimum(t, s), t)
        return DualLevels(levels=levels, index=mask.long(), mask=mask, teacher_levels=teacher)
