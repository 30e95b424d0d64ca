"""Self-Flow representation loss: projected student features against the EMA teacher's features."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """Linear D -> 2D, SiLU, Linear 2D -> D, applied per token; initialised as the released model's
    projector (xavier-uniform weights, zero biases)."""

    def __init__(self, width: int, hidden_mult: int = 2):
        super().__init__()
        self.linear1 = nn.Linear(width, hidden_mult * width)
        self.act = nn.SiLU()
        self.linear2 = nn.Linear(hidden_mult * width, width)
        for linear in (self.linear1, self.linear2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.linear2(self.act(self.linear1(h)))


def cosine_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """1 - cos over the feature axis, per token: [B, N, D] x [B, N, D] -> [B, N]."""
    return 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)
