"""Embeddings: noise level, class label, multi-axis rotary positions and fixed 2D sin-cos
positions."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """t: [...] -> [..., dim] as (cos, sin) halves over geometric frequencies (the DiT convention).

    Args:
        t: [...] values to embed (scaled noise levels).
        dim: The embedding width; an odd width gets a zero last channel.
        max_period: The longest period of the frequencies.

    Returns:
        [..., dim] float32 features.
    """
    half = dim // 2
    steps = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * steps / half)
    args = t.float()[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Noise level -> width-D vector: sinusoidal features of `scale * t`, then an MLP.

    Args:
        width: D, the model width.
        frequency_dim: Width of the sinusoidal features.
        scale: Levels are multiplied by it first (1000 as in DiT; 1 for the released model).
    """

    def __init__(self, width: int, frequency_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.frequency_dim, self.scale = frequency_dim, scale
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, width),
            nn.SiLU(),
            nn.Linear(width, width),
        )

    def forward(self, t: Tensor) -> Tensor:  # t: [...] -> [..., D]
        """Embed noise levels.

        Args:
            t: [...] noise levels in [0, 1].

        Returns:
            [..., D] level embeddings.
        """
        features = sinusoidal_embedding(t * self.scale, self.frequency_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector; index `num_classes` is the null class used for guidance and dropout.

    Args:
        num_classes: The classes (0 for an unconditional model, which has the null class only).
        width: D, the model width.
    """

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: Tensor) -> Tensor:
        """Embed class ids.

        Args:
            labels: [...] long ids in 0..num_classes (num_classes is the null class).

        Returns:
            [..., D] label embeddings.
        """
        return self.embedding_table(labels)


def default_rope_axes(head_dim: int, num_axes: int = 4) -> list[int]:
    """Split the head width over the (t, h, w, l) axes in even sizes, as equally as possible.

    Args:
        head_dim: The attention head width.
        num_axes: The position axes.

    Returns:
        Even sizes per axis summing to `head_dim` (odd spare pairs go to the spatial axes).
    """
    pairs = head_dim // 2
    sizes = [pairs // num_axes] * num_axes
    for i in range(pairs - sum(sizes)):
        sizes[1 + i % (num_axes - 1)] += 1  # spare pairs go to the spatial axes first
    return [2 * s for s in sizes]


class MultiAxisRoPE(nn.Module):
    """Rotary embedding over integer position ids [B, N, A]: one rotary block per axis, sizes
    summing to the head width.

    Args:
        head_dim: The attention head width.
        axes_dim: Even rotary sizes per axis summing to `head_dim`; None for `default_rope_axes`.
        theta: The base frequency.

    Raises:
        ValueError: `axes_dim` sizes are odd or do not sum to `head_dim`.
    """

    def __init__(self, head_dim: int, axes_dim: list[int] | None = None, theta: float = 10000.0):
        super().__init__()
        axes_dim = list(axes_dim) if axes_dim is not None else default_rope_axes(head_dim)
        if sum(axes_dim) != head_dim or any(d % 2 for d in axes_dim):
            raise ValueError(
                f"model.rope_axes={axes_dim} must be even sizes summing to the head width "
                f"{head_dim}; leave it null for an automatic split",
            )
        self.axes_dim, self.theta = axes_dim, theta

    def forward(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """pos: [B, N, A] -> (cos, sin), each [B, 1, N, head_dim / 2] in float32.

        Args:
            pos: [B, N, A] integer position ids, one column per axis.

        Returns:
            (cos, sin) of the rotation angles (computed in float64), each [B, 1, N, head_dim / 2].
        """
        angles = []
        for axis, dim in enumerate(self.axes_dim):
            if dim == 0:
                continue
            even = torch.arange(0, dim, 2, device=pos.device, dtype=torch.float64)
            freqs = 1.0 / self.theta ** (even / dim)
            angles.append(pos[..., axis, None].double() * freqs)  # [B, N, dim/2]
        angle = torch.cat(angles, dim=-1).float()[:, None]
        return angle.cos(), angle.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive channel pairs of x: [B, H, N, Dh] by the given angles, computed in
    float32.

    Args:
        x: [B, H, N, Dh] queries or keys.
        cos: [B, 1, N, Dh / 2] cosines of the angles.
        sin: [B, 1, N, Dh / 2] sines of the angles.

    Returns:
        [B, H, N, Dh] the rotated tensor in x's dtype.
    """
    pairs = rearrange(x.float(), "... (d two) -> ... d two", two=2)
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return rearrange(rotated, "... d two -> ... (d two)").type_as(x)


def sincos_2d(pos: Tensor, width: int) -> Tensor:
    """Fixed 2D sin-cos embedding from (h, w) ids of pos: [B, N, 4] -> [B, N, width].

    First half encodes the column (w), second half the row (h), each as (sin, cos): the layout of
    the MAE/DiT grid embedding, so models trained with it (the released ImageNet model) get
    identical inputs.

    Args:
        pos: [B, N, 4] position ids; the h and w columns are used.
        width: D, divisible by 4.

    Returns:
        [B, N, D] float32 embeddings.

    Raises:
        ValueError: `width` is not divisible by 4.
    """
    if width % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=pos.device, dtype=torch.float64) / quarter)

    def one_axis(coord: Tensor) -> Tensor:
        args = coord.double()[..., None] * omega
        return torch.cat([args.sin(), args.cos()], dim=-1)

    return torch.cat([one_axis(pos[..., 2]), one_axis(pos[..., 1])], dim=-1).float()
