"""Per-token noise levels as a table of each sample's distinct levels plus an index per token.

The model runs its adaLN modulation MLPs on the table (`levels: [B, L]`) and gathers the result per
token (`level_index: [B, N]`), so a caller holding only per-token levels gets the cost of its few
distinct ones.
"""

from __future__ import annotations

import torch
from torch import Tensor


def distinct_levels(t: Tensor) -> tuple[Tensor, Tensor]:
    """t: [B, N] -> (levels [B, L], index [B, N] long) with levels[b, index[b, n]] == t[b, n]
    exactly.

    L is the largest number of distinct levels in any row; a row with fewer repeats its smallest
    level.
    """
    sorted_t, order = t.sort(dim=1)  # [B, N]
    starts = torch.ones_like(sorted_t, dtype=torch.bool)
    starts[:, 1:] = sorted_t[:, 1:] != sorted_t[:, :-1]
    rank = starts.long().cumsum(dim=1) - 1  # [B, N]: the distinct-level number of each sorted token
    index = torch.empty_like(rank).scatter_(1, order, rank)
    levels = int(rank[:, -1].max()) + 1
    table = sorted_t[:, :1].repeat(1, levels)  # [B, L], filled with each row's smallest level
    return table.scatter_(1, rank, sorted_t), index
