"""Writing samples to files a person can open."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """[B, C, H, W] in [0, 1] -> uint8 [B, H, W, 3] (grey images repeated to RGB)."""
    images = images.detach().float().clamp(0, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (rearrange(images, "b c h w -> b h w c") * 255).round().to(torch.uint8).cpu().numpy()


def image_grid(images: Tensor, nrow: int | None = None, upscale: int = 1, pad: int = 2) -> Image.Image:
    """A grid of images [B, C, H, W] in [0, 1], upscaled by nearest neighbour so small samples are visible."""
    pixels = to_uint8(images)
    b, h, w, _ = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    canvas = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, image in enumerate(pixels):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = image
    grid = Image.fromarray(canvas)
    if upscale > 1:
        grid = grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST)
    return grid


def save_image_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None, upscale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow, upscale).save(path)
    return path
