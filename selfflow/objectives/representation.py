"""Self-Flow representation loss: projected student features against the EMA teacher's features."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """Linear D -> 2D, SiLU, Linear 2D -> D, applied per token; initialised as the released model's
    projector (xavier-uniform weights, zero biases).

    Args:
        width: D, the student's hidden width.
        hidden_mult: The hidden width as a multiple of D (2 in the paper).
    """

    def __init__(self, width: int, hidden_mult: int = 2):
        super().__init__()
        self.linear1 = nn.Linear(width, hidden_mult * width)
        self.act = nn.SiLU()
        self.linear2 = nn.Linear(hidden_mult * width, width)
        for linear in (self.linear1, self.linear2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, h: Tensor) -> Tensor:
        """Project student features into the teacher's feature space.

        Args:
            h: [B, N, D] the student's hidden state after its block `l`.

        Returns:
            [B, N, D] the projected features compared with the teacher's.
        """
        return self.linear2(self.act(self.linear1(h)))


def cosine_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """1 - cos over the feature axis, per token: [B, N, D] x [B, N, D] -> [B, N].

    Args:
        student: [B, N, D] the projected student features.
        teacher: [B, N, D] the EMA teacher's features (computed without gradient).

    Returns:
        [B, N] float32 distances in [0, 2].
    """
    return 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)
