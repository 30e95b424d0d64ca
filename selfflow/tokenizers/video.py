"""Video tokenizer: non-overlapping tubelets of pt frames x p x p pixels with (t, h, w, 0)
position ids."""

from __future__ import annotations

import copy

import torch
from einops import rearrange
from torch import Tensor

from selfflow.tokenizers.base import Tokenizer
from selfflow.tokens import Tokens


def grid_positions(t: int, h: int, w: int, batch_size: int, device=None) -> Tensor:
    """[B, t*h*w, 4] position ids (t, h, w, 0) of a token grid in row-major (t, h, w) order.

    Args:
        t: Tubelets along time.
        h: Tubelets along the height.
        w: Tubelets along the width.
        batch_size: B, the number of samples.
        device (torch.device | str | None): Where the ids are made; None for the default device.

    Returns:
        [B, t*h*w, 4] long ids, the same for every sample.
    """
    axes = torch.meshgrid(
        torch.arange(t, device=device),
        torch.arange(h, device=device),
        torch.arange(w, device=device),
        indexing="ij",
    )
    pos = torch.stack([*axes, torch.zeros_like(axes[0])], dim=-1)  # [t, h, w, 4]
    return rearrange(pos, "t h w a -> (t h w) a").expand(batch_size, -1, -1)


def to_tubelets(video: Tensor, tubelet_frames: int, patch_size: int) -> Tensor:
    """video: [B, T, C, H, W] -> tokens [B, (T/pt)(H/p)(W/p), C pt p p], channel order (c pt p q).

    Args:
        video: [B, T, C, H, W] clips, T a multiple of `tubelet_frames`, H and W of `patch_size`.
        tubelet_frames: pt, the frames of one tubelet.
        patch_size: p, the side of a tubelet in pixels.

    Returns:
        [B, (T/pt)(H/p)(W/p), C pt p p] tokens, row-major over (t, h, w).
    """
    p = patch_size
    return rearrange(
        video, "b (t u) c (h p) (w q) -> b (t h w) (c u p q)", u=tubelet_frames, p=p, q=p
    )


def from_tubelets(
    x: Tensor, grid: tuple[int, int, int], tubelet_frames: int, patch_size: int
) -> Tensor:
    """The inverse of `to_tubelets`: [B, N, C pt p p] -> [B, T, C, H, W].

    Args:
        x: [B, N, C pt p p] tokens with N = t h w.
        grid: (t, h, w) tubelets along time, height and width.
        tubelet_frames: pt, the frames of one tubelet.
        patch_size: p, the side of a tubelet in pixels.

    Returns:
        [B, t pt, C, h p, w p] clips.
    """
    t, h, w = grid
    p = patch_size
    return rearrange(
        x, "b (t h w) (c u p q) -> b (t u) c (h p) (w q)", t=t, h=h, w=w, u=tubelet_frames, p=p, q=p
    )


def tubelet_grid(
    shape: tuple[int, int, int], tubelet_frames: int, patch_size: int, what: str
) -> tuple[int, int, int]:
    """(T, H, W) -> the token grid (T/pt, H/p, W/p), or a ValueError naming the sizes that do
    not divide.

    Args:
        shape: (T, H, W) frames, height and width of the clips.
        tubelet_frames: pt, the frames of one tubelet.
        patch_size: p, the side of a tubelet in pixels.
        what: What `shape` is the size of, for the error message (`clips`).

    Returns:
        (T/pt, H/p, W/p) tubelets along each axis.

    Raises:
        ValueError: A tubelet size does not divide its axis.
    """
    t, h, w = shape
    if (
        tubelet_frames < 1
        or patch_size < 1
        or t % tubelet_frames
        or h % patch_size
        or w % patch_size
    ):
        raise ValueError(
            f"tokenizer.video tubelets of {tubelet_frames} frames x {patch_size} x {patch_size} do "
            f"not divide the {what} of {t} frames x {h} x {w}; pick tubelet_frames dividing the "
            f"frame count and patch_size dividing the size (or change "
            f"data.dataset.num_frames/image_size)"
        )
    return t // tubelet_frames, h // patch_size, w // patch_size


class VideoTubeletTokenizer(Tokenizer):
    """Clips [B, T, C, H, W] in [0, 1] -> tokens [B, (T/pt)(H/p)(W/p), C pt p p] in [-1, 1].

    `decode` is the exact inverse (back to [0, 1], clamped). `fps` is the rate samples are
    written at.

    Args:
        tubelet_frames: pt, the frames of one tubelet; divides `num_frames`.
        patch_size: p, the side of a tubelet in pixels; divides `image_size`.
        channels: C, the channels of a frame.
        num_frames: T, the frames of a clip generation starts from.
        image_size: H = W, the side of a square frame.
        fps: The rate samples are written at; None (data read at a frame stride) writes 8 fps.

    Raises:
        ValueError: A tubelet size does not divide the clip size.
    """

    modality = "video"

    def __init__(
        self,
        tubelet_frames: int = 2,
        patch_size: int = 4,
        channels: int = 1,
        num_frames: int = 8,
        image_size: int = 16,
        fps: float | None = 8.0,
    ):
        super().__init__()
        self.tubelet_frames, self.patch_size, self.channels = tubelet_frames, patch_size, channels
        # the rate samples are written at; null (data read at a frame stride, not a rate) writes
        # 8 fps
        self.num_frames, self.image_size, self.fps = (
            num_frames,
            image_size,
            float(fps) if fps else 8.0,
        )
        self.grid = tubelet_grid(
            (num_frames, image_size, image_size), tubelet_frames, patch_size, "clips"
        )
        self.token_channels = channels * tubelet_frames * patch_size * patch_size

    def at_frames(self, num_frames: int) -> VideoTubeletTokenizer:
        """The same tokenizer for clips of `num_frames` frames (frame-count buckets, or sampling
        another length).

        Args:
            num_frames: The new clip length, a whole number of tubelets.

        Returns:
            This tokenizer when the length is unchanged, otherwise a shallow copy at the new length.

        Raises:
            ValueError: `num_frames` is not a positive multiple of `tubelet_frames`.
        """
        if num_frames == self.num_frames:
            return self
        if (
            num_frames != int(num_frames)
            or num_frames < self.tubelet_frames
            or num_frames % self.tubelet_frames
        ):
            raise ValueError(
                f"a clip of {num_frames} frames is not a whole number of tokenizer.video tubelets "
                f"of {self.tubelet_frames} frames; use frame counts that are multiples of "
                f"{self.tubelet_frames}"
            )
        other = copy.copy(self)
        other.num_frames = int(num_frames)
        other.grid = (other.num_frames // self.tubelet_frames, *self.grid[1:])
        return other

    at_length = at_frames  # length buckets are frame counts for video (data.dataset.frame_counts)

    def encode(self, video: Tensor) -> Tokens:
        """video: [B, T, C, H, W]; T may differ from `num_frames` (frame-count buckets) when it is
        whole tubelets.

        Args:
            video: [B, T, C, H, W] clips in [0, 1].

        Returns:
            Tokens with x: [B, (T/pt)(H/p)(W/p), C pt p p] in [-1, 1] and ids (t, h, w, 0).

        Raises:
            ValueError: The clips' channels or size differ from the tokenizer's.
        """
        expected = ("T", self.channels, self.image_size, self.image_size)
        if video.ndim != 5 or tuple(video.shape[2:]) != expected[1:]:
            raise ValueError(
                f"video tokenizer expects [B, {', '.join(map(str, expected))}] (B, T, C, H, W; T = "
                f"{self.num_frames} or another whole number of tubelets), got {list(video.shape)}; "
                f"set tokenizer.video.num_frames/channels/image_size to match the data"
            )
        tokenizer = self.at_frames(video.shape[1])
        x = to_tubelets(video * 2 - 1, self.tubelet_frames, self.patch_size)
        return Tokens(
            x=x, pos=tokenizer.positions(video.shape[0], video.device), modality=self.modality
        )

    def decode(self, x: Tensor) -> Tensor:
        """x: [B, N, C pt p p] -> clips [B, T, C, H, W] in [0, 1]; T follows N
        (frame-count buckets).

        Args:
            x: [B, N, C pt p p] tokens, N a whole number of tubelet frames of the tokenizer's size.

        Returns:
            [B, T, C, H, W] clips in [0, 1] (clamped).

        Raises:
            ValueError: N is not a whole number of tubelet frames.
        """
        per_tubelet = self.grid[1] * self.grid[2]
        tubelets, rest = divmod(x.shape[1], per_tubelet)
        if rest or not tubelets:
            raise ValueError(
                f"{x.shape[1]} video tokens are not whole tubelet frames of {per_tubelet} tokens"
            )
        grid = (tubelets, *self.grid[1:])
        video = from_tubelets(x, grid, self.tubelet_frames, self.patch_size)
        return ((video + 1) / 2).clamp(0, 1)

    def positions(self, batch_size: int, device=None) -> Tensor:
        """[B, N, 4] ids (t, h, w, 0) of a clip of `num_frames` frames.

        Args:
            batch_size: B, the number of samples.
            device (torch.device | str | None): Where the ids are made; None for the default device.

        Returns:
            [B, N, 4] long ids, row-major over (t, h, w).
        """
        return grid_positions(*self.grid, batch_size, device)
