"""Dual-timestep scheduling: two iid levels per sample, spread over its tokens by a random mask.

A "sample" is a segment of a row: an unpacked batch has one per row, a packed batch several.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from selfflow.flow.timesteps import TimestepDistribution, Uniform

MASK_MODES = ("exact", "bernoulli")


@dataclass
class DualLevels:
    """Per-sample levels and how they map onto tokens (R rows, S samples per row, N tokens).

    Attributes:
        levels: [R, 2S] (t, s) of each sample, unsorted: `levels[r, 2k]` = t, `levels[r, 2k + 1]` =
            s.
        index: [R, N] long, 2 * sample + (1 if masked): where each token's student level is in
            `levels`.
        mask: [R, N] bool, the masked set M (tokens at level s).
        teacher_levels: [R, S] each sample's teacher level, the cleaner of its two.
        segment: [R, N] long, the sample of each token in its row; -1 on padding.

    The student sees token n of row r at `levels[r, index[r, n]]`, where `levels` holds (t, s) of
    each sample: `levels[r, 2k]` = t and `levels[r, 2k + 1]` = s of sample k. The teacher sees every
    token of sample k at `teacher_levels[r, k]`: min(t, s), the cleaner of the two, whatever its
    mask drew (t itself for a sample with mask ratio 0, which has no second level).
    """

    levels: Tensor  # [R, 2S], unsorted pairs
    index: Tensor  # [R, N] long: 2 * sample + (1 if masked)
    mask: Tensor  # [R, N] bool: the masked set M
    teacher_levels: Tensor  # [R, S]
    segment: Tensor  # [R, N] long sample of each token, -1 on padding

    @property
    def per_token(self) -> Tensor:
        """[R, N] student level of every token."""
        return torch.gather(self.levels, 1, self.index)

    @property
    def teacher_index(self) -> Tensor:
        """[R, N] long, where each token's teacher level is in `teacher_levels` (its sample)."""
        return self.segment.clamp_min(0)

    @property
    def teacher_per_token(self) -> Tensor:
        """[R, N] teacher level of every token."""
        return torch.gather(self.teacher_levels, 1, self.teacher_index)


def check_mask_ratio(ratio: float, name: str = "objective.mask_ratio") -> float:
    """A mask ratio is a number in [0, 0.5]: the masked group is the smaller one.

    Args:
        ratio: The ratio to check.
        name: The config key that set it (named in the error).

    Returns:
        The ratio as a float.

    Raises:
        ValueError: The ratio is not a number in [0, 0.5].
    """
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio <= 0.5:
        raise ValueError(
            f"{name}={ratio!r} is out of range: the masked group must be the smaller one, so use "
            "a value in [0, 0.5] (0 = vanilla flow matching; method defaults: image 0.25, "
            "video 0.10, audio 0.50)"
        )
    return float(ratio)


def rank_within_segments(scores: Tensor, segment: Tensor, num_segments: int) -> Tensor:
    """[R, N] rank of each token's score among the tokens of its own segment (padding ranks last).

    Args:
        scores: [R, N] scores in [0, 1) (random draws).
        segment: [R, N] long, the sample of each token; -1 on padding.
        num_segments: S, the sample slots per row.

    Returns:
        [R, N] long, 0 for the lowest score of each segment.
    """
    seg = torch.where(segment < 0, num_segments, segment)
    keys = seg.to(scores.dtype) * 2 + scores  # grouped by segment, by score inside
    order = keys.argsort(dim=1)
    sizes = torch.zeros(seg.shape[0], num_segments + 1, dtype=torch.long, device=seg.device)
    sizes.scatter_add_(1, seg, torch.ones_like(seg))
    starts = sizes.cumsum(dim=1) - sizes  # [R, S + 1] first sorted position of each segment
    sorted_seg = torch.gather(seg, 1, order)
    first = torch.gather(starts, 1, sorted_seg)
    rank_sorted = torch.arange(seg.shape[1], device=seg.device) - first
    return torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)


class DualTimestepScheduler:
    """Draws (t, s) iid from p(t), never sorted, and a token mask of ratio r <= 0.5 per sample.

    mask_mode="exact": exactly round(r * n_tokens) masked tokens per sample via a random
    permutation; mask_mode="bernoulli": each token independently with probability r.

    Args:
        mask_ratio: r in [0, 0.5], the share of tokens at level s (0 = vanilla flow matching).
        timesteps: The distribution p(t) both levels are drawn from; None for uniform.
        mask_mode: `exact` or `bernoulli`.

    Raises:
        ValueError: `mask_ratio` outside [0, 0.5] or an unknown `mask_mode`.
    """

    def __init__(
        self,
        mask_ratio: float,
        timesteps: TimestepDistribution | None = None,
        mask_mode: str = "exact",
    ):
        self.mask_ratio = check_mask_ratio(mask_ratio)
        if mask_mode not in MASK_MODES:
            choices = ", ".join(MASK_MODES)
            raise ValueError(
                f"objective.mask_mode={mask_mode!r} is unknown; choose one of: {choices}",
            )
        self.mask_mode = mask_mode
        self.timesteps = timesteps or Uniform()

    def draw_mask(self, segment: Tensor, num_segments: int, ratios: Tensor) -> Tensor:
        """[R, N] bool mask; ratios: [R, S] per sample. Padding (segment -1) is never masked.

        Args:
            segment: [R, N] long, the sample of each token; -1 on padding.
            num_segments: S, the sample slots per row.
            ratios: [R, S] each sample's mask ratio.

        Returns:
            [R, N] bool, True on the masked tokens.
        """
        valid = segment >= 0
        token_ratio = torch.gather(ratios, 1, segment.clamp_min(0))  # [R, N]
        scores = torch.rand(segment.shape, device=segment.device)
        if self.mask_mode == "bernoulli":
            return (scores < token_ratio) & valid
        sample = segment.clamp_min(0)
        lengths = torch.zeros_like(ratios).scatter_add_(1, sample, valid.to(ratios.dtype))
        counts = torch.round(lengths * ratios)  # [R, S]
        ranks = rank_within_segments(scores, segment, num_segments)
        return (ranks < torch.gather(counts, 1, segment.clamp_min(0))) & valid

    def for_segments(
        self,
        segment: Tensor,
        num_segments: int,
        ratios: Tensor | None = None,
    ) -> DualLevels:
        """segment: [R, N] sample of each token (-1 padding); ratios: [R, S] (default: this
        scheduler's ratio).

        Args:
            segment: [R, N] long, the sample of each token; -1 on padding.
            num_segments: S, the sample slots per row.
            ratios: [R, S] each sample's mask ratio; None for this scheduler's ratio everywhere.

        Returns:
            Both levels of every sample, the mask, and the student's and teacher's level of each
                token.
        """
        rows, device = segment.shape[0], segment.device
        if ratios is None:
            ratios = torch.full((rows, num_segments), self.mask_ratio, device=device)
        per_sample = torch.zeros(rows, num_segments, device=device)
        valid = (segment >= 0).float()
        lengths = per_sample.scatter_add_(1, segment.clamp_min(0), valid).flatten()  # [R S] tokens
        draws = rows * num_segments
        t = self.timesteps.sample(draws, device=device, lengths=lengths).view(rows, num_segments)
        s = self.timesteps.sample(draws, device=device, lengths=lengths).view(rows, num_segments)
        levels = torch.stack([t, s], dim=-1).flatten(1)  # [R, 2S] -- deliberately not sorted
        if float(ratios.max()) > 0:
            mask = self.draw_mask(segment, num_segments, ratios)
        else:
            mask = torch.zeros(segment.shape, dtype=torch.bool, device=device)
        # every sample with a second level (ratio > 0) gives its teacher min(t, s), also when its
        # draw masked no token (Bernoulli masks, or a sample too short for one); a sample with ratio
        # 0 has t alone
        teacher = torch.where(ratios > 0, torch.minimum(t, s), t)
        index = 2 * segment.clamp_min(0) + mask.long()
        return DualLevels(
            levels=levels,
            index=index,
            mask=mask,
            teacher_levels=teacher,
            segment=segment,
        )

    def __call__(
        self,
        batch: int,
        tokens: int,
        valid: Tensor | None = None,
        device=None,
    ) -> DualLevels:
        """One sample per row; valid: [B, N] bool, False on padding (never masked, not counted).

        Args:
            batch: B, the rows.
            tokens: N, the tokens per row.
            valid: [B, N] bool, False on padding; None when every token is valid.
            device (torch.device | str | None): Where the levels are made; None for the default
                device.

        Returns:
            The levels of an unpacked batch (S = 1).
        """
        if valid is None:
            segment = torch.zeros(batch, tokens, dtype=torch.long, device=device)
        else:
            segment = torch.where(valid, 0, -1)
        return self.for_segments(segment, 1)
