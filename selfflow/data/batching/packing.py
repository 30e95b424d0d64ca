"""Sequence packing: samples of any modality and length placed into fixed-length rows
(first-fit decreasing)."""

from __future__ import annotations

import torch
from torch import Tensor

from selfflow.tokens import PackedTokens, Tokens


def plan_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """Indices of the samples in each row, longest first into the first row with room."""
    too_long = [n for n in lengths if n > row_length]
    if too_long:
        raise ValueError(
            f"data.pack_length={row_length} is shorter than a sample of {max(too_long)} tokens; "
            f"raise data.pack_length to at least {max(too_long)}"
        )
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_length - lengths[i])
    return rows


def pack(
    samples: list[Tokens], labels: list[int], row_length: int, null_label: int
) -> PackedTokens:
    """samples: one `Tokens` per sample (batch size 1, any modality); returns rows of
    `row_length` tokens."""
    lengths = [s.num_tokens for s in samples]
    rows = plan_rows(lengths, row_length)
    channels: dict[str, int] = {}
    for s in samples:
        channels.setdefault(s.modality, s.x.shape[-1])
    c_max, device = max(channels.values()), samples[0].x.device
    num_rows, max_segments = len(rows), max(len(r) for r in rows)
    x = torch.zeros(num_rows, row_length, c_max, dtype=samples[0].x.dtype, device=device)
    pos = torch.zeros(num_rows, row_length, 4, dtype=torch.long, device=device)
    segment = torch.full((num_rows, row_length), -1, dtype=torch.long, device=device)
    masks = {
        m: torch.zeros(num_rows, row_length, dtype=torch.bool, device=device) for m in channels
    }
    segment_labels = torch.full(
        (num_rows, max_segments), null_label, dtype=torch.long, device=device
    )
    segment_modality: list[list[str]] = []
    for r, members in enumerate(rows):
        start = 0
        segment_modality.append([])
        for k, i in enumerate(members):
            s, n = samples[i], lengths[i]
            x[r, start : start + n, : s.x.shape[-1]] = s.x[0]
            pos[r, start : start + n] = s.pos[0]
            segment[r, start : start + n] = k
            masks[s.modality][r, start : start + n] = True
            segment_labels[r, k] = labels[i]
            segment_modality[r].append(s.modality)
            start += n
    return PackedTokens(
        x=x,
        pos=pos,
        segment=segment,
        modality_masks=masks,
        segment_labels=segment_labels,
        segment_modality=segment_modality,
        channels=channels,
        order=rows,
    )


def unpack(values: Tensor, packed: PackedTokens) -> list[Tensor]:
    """Per-token values [R, N, ...] back to one tensor per sample, in the order given to `pack`.

    Token channels are cut to each sample's own modality when values carry token channels.
    """
    out: list[Tensor | None] = [None] * sum(len(r) for r in packed.order)
    for r, members in enumerate(packed.order):
        for k, i in enumerate(members):
            piece = values[r][packed.segment[r] == k]
            if values.dim() == 3 and values.shape[-1] == packed.x.shape[-1]:
                piece = piece[:, : packed.channels[packed.segment_modality[r][k]]]
            out[i] = piece
    return out
