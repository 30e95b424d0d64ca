"""Token batches: one modality padded per batch (`Tokens`), or samples of any modality packed into rows
(`PackedTokens`, block-diagonal attention, no compute spent on padding)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

POSITION_AXES = ("t", "h", "w", "l")


@dataclass
class Tokens:
    """A batch of token sequences of one modality."""

    x: Tensor  # [B, N, C] token features
    pos: Tensor  # [B, N, 4] long position ids over (t, h, w, l)
    modality: str
    valid: Tensor | None = None  # [B, N] bool, False on padding; None = all valid

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]


@dataclass
class PackedTokens:
    """Samples of possibly different modalities and lengths packed into R rows of N tokens.

    Token n of row r belongs to sample `segment[r, n]` of that row (-1 on padding). Channels differ per modality:
    `x` holds each token's own channels first and zeros after them.
    """

    x: Tensor  # [R, N, C_max]
    pos: Tensor  # [R, N, 4]
    segment: Tensor  # [R, N] long, -1 on padding
    modality_masks: dict[str, Tensor]  # modality -> [R, N] bool
    segment_labels: Tensor  # [R, S] long (the null label on empty segment slots)
    segment_modality: list[list[str]]  # row -> the modality of each of its samples
    channels: dict[str, int]  # modality -> its token channels
    order: list[list[int]] = field(default_factory=list)  # row -> indices of its samples in the packed input

    @property
    def valid(self) -> Tensor:
        return self.segment >= 0

    @property
    def num_segments(self) -> int:
        return self.segment_labels.shape[1]

    @property
    def batch_size(self) -> int:
        """Samples in all rows (not rows)."""
        return sum(len(row) for row in self.segment_modality)

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum())


def as_segments(tokens: Tokens) -> Tensor:
    """[B, N] segment ids of an unpacked batch: every row is one sample (0), padding is -1."""
    if tokens.valid is None:
        return torch.zeros(tokens.x.shape[:2], dtype=torch.long, device=tokens.x.device)
    return torch.where(tokens.valid, 0, -1)
