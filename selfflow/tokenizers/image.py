"""Image tokenizer: non-overlapping pixel patches with (0, h, w, 0) position ids."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from selfflow.tokenizers.base import Tokenizer
from selfflow.tokens import Tokens


class ImagePatchTokenizer(Tokenizer):
    """Images [B, C, H, W] in [0, 1] -> tokens [B, (H/p)(W/p), C p p] in [-1, 1], channel order (c
    p q).

    `decode` is the exact inverse (back to [0, 1], clamped). `image_size` is the size generation
    starts from; `encode` takes any size whose sides are whole patches (multi-aspect batches), with
    ids from the actual grid.

    Args:
        patch_size: p, the side of a square patch in pixels.
        channels: C, the image channels (3 for RGB, or an autoencoder's latent channels).
        image_size: The size generation starts from, one side or (H, W), divisible by `patch_size`.

    Raises:
        ValueError: `patch_size` does not divide the image size.
    """

    modality = "image"

    def __init__(
        self, patch_size: int = 2, channels: int = 3, image_size: int | tuple[int, int] = 32
    ):
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if patch_size < 1 or h % patch_size or w % patch_size:
            raise ValueError(
                f"tokenizer.image.patch_size={patch_size} must divide the image size {h}x{w}; "
                f"pick a patch size that divides both sides or change data.dataset.image_size"
            )
        self.patch_size, self.channels, self.image_size = patch_size, channels, (h, w)
        self.grid = (h // patch_size, w // patch_size)
        self.token_channels = channels * patch_size * patch_size

    def encode(self, images: Tensor) -> Tokens:
        """Images -> patch tokens, with ids from the images' own grid (any multiple of the patch).

        Args:
            images: [B, C, H, W] in [0, 1], H and W multiples of `patch_size`.

        Returns:
            Tokens with x: [B, (H/p)(W/p), C p p] in [-1, 1] and ids (0, h, w, 0).

        Raises:
            ValueError: The channels differ from `channels` or a side is not whole patches.
        """
        b, c, h, w = images.shape
        p = self.patch_size
        if c != self.channels or h % p or w % p:
            raise ValueError(
                f"image tokenizer expects [B, {self.channels}, {self.image_size[0]}, "
                f"{self.image_size[1]}] (or any H, W that are multiples of patch_size={p}), got "
                f"{list(images.shape)}; the "
                "tokenizer takes "
                f"channels and image_size from data.dataset (a mixture: data.sources.image.dataset)"
            )
        x = rearrange(images * 2 - 1, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)
        return Tokens(
            x=x, pos=self.positions(b, images.device, grid=(h // p, w // p)), modality=self.modality
        )

    def decode(self, x: Tensor) -> Tensor:
        """x: [B, N, C p p] -> images [B, C, H, W] in [0, 1].

        Args:
            x: [B, N, C p p] tokens of an `image_size` image.

        Returns:
            [B, C, H, W] images in [0, 1] (clamped).
        """
        gh, gw = self.grid
        p = self.patch_size
        images = rearrange(x, "b (h w) (c p q) -> b c (h p) (w q)", h=gh, w=gw, p=p, q=p)
        return ((images + 1) / 2).clamp(0, 1)

    def positions(
        self, batch_size: int, device=None, grid: tuple[int, int] | None = None
    ) -> Tensor:
        """[B, gh gw, 4] ids (0, h, w, 0) of a `grid` of patches (default: that of `image_size`).

        Args:
            batch_size: B, the number of samples.
            device (torch.device | str | None): Where the ids are made; None for the default device.
            grid: (gh, gw) patches per side; None for the grid of `image_size`.

        Returns:
            [B, gh gw, 4] long ids, row-major over the grid.
        """
        gh, gw = grid or self.grid
        h, w = torch.meshgrid(
            torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij"
        )
        zeros = torch.zeros_like(h)
        pos = torch.stack([zeros, h, w, zeros], dim=-1)  # [gh, gw, 4]
        return rearrange(pos, "h w a -> (h w) a").expand(batch_size, -1, -1)
