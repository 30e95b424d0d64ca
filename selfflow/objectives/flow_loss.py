"""Flow-matching loss and its breakdown by noise level."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def masked_mean(values: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of values: [B, N] over the tokens where valid: [B, N] is True (all when None).

    Args:
        values: [B, N] per-token values.
        valid: [B, N] bool, False on padding; None when every token counts.

    Returns:
        The scalar mean over the valid tokens (0 when there are none).
    """
    if valid is None:
        return values.mean()
    weights = valid.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def own_channels(channels: Tensor, width: int) -> Tensor:
    """[B, N, C] bool: True on the first `channels[b, n]` of `width` channels, a token's own (packed
    rows of mixed modalities zero-pad the narrower tokens to the widest).

    Args:
        channels: [B, N] long, how many leading channels belong to each token.
        width: C, the channels of the packed tensor.

    Returns:
        [B, N, C] bool, True on each token's own channels.
    """
    return torch.arange(width, device=channels.device) < channels[..., None]


def token_squared_error(
    prediction: Tensor,
    target: Tensor,
    channels: Tensor | None = None,
) -> Tensor:
    """Mean squared error over each token's own channels: [B, N, C] -> [B, N], in float32.

    channels: [B, N] how many leading channels belong to each token (None: all C), so that a token's
    error does not depend on the width of the other modalities it is packed with; a token with none
    (padding) gets 0.

    Args:
        prediction: [B, N, C] the predicted velocity.
        target: [B, N, C] the velocity target x1 - x0.
        channels: [B, N] how many leading channels belong to each token; None when all C do.

    Returns:
        [B, N] float32 per-token mean squared error.
    """
    squared = (prediction.float() - target.float()).pow(2)
    if channels is None:
        return squared.mean(dim=-1)
    own = own_channels(channels, squared.shape[-1])
    return torch.where(own, squared, 0.0).sum(dim=-1) / channels.clamp_min(1).to(squared.dtype)


def bucket_sums(
    values: Tensor,
    levels: Tensor,
    buckets: int,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sum and count of per-token values: [B, N] in `buckets` equal ranges of their level: [B, N].

    Returns (sums, counts), each [buckets]; no host sync, so it is cheap to compute every step.

    Args:
        values: [B, N] per-token values (e.g. the flow loss).
        levels: [B, N] each token's noise level in [0, 1].
        buckets: How many equal ranges [0, 1] is cut into.
        valid: [B, N] bool, False on padding; None when every token counts.

    Returns:
        (sums, counts), each [buckets], on the values' device.
    """
    which = torch.clamp((levels.float() * buckets).long(), 0, buckets - 1).flatten()
    if valid is not None:
        weights = valid.flatten().to(values.dtype)
    else:
        weights = torch.ones_like(which, dtype=values.dtype)
    zeros = torch.zeros(buckets, device=values.device, dtype=values.dtype)
    sums = zeros.clone().index_add_(0, which, values.flatten() * weights)
    counts = zeros.index_add_(0, which, weights)
    return sums, counts


def bucket_names(buckets: int) -> list[str]:
    """Names of the level ranges, e.g. ["0.00-0.25", ..., "0.75-1.00"].

    Args:
        buckets: How many equal ranges [0, 1] is cut into.

    Returns:
        One `lo-hi` name per range, lowest first.
    """
    edges = [i / buckets for i in range(buckets + 1)]
    return [f"{lo:.2f}-{hi:.2f}" for lo, hi in itertools.pairwise(edges)]
