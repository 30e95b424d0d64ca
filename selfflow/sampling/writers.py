"""Writing samples to files a person can open, and to the arrays metric suites read."""
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


def save_image_files(images: Tensor, folder: str | os.PathLike, names: list[str], upscale: int = 1) -> list[Path]:
    """One PNG per image [B, C, H, W] in [0, 1], named `names[i].png`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for pixels, name in zip(to_uint8(images), names):
        image = Image.fromarray(pixels)
        if upscale > 1:
            image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
        image.save(folder / f"{name}.png")
        paths.append(folder / f"{name}.png")
    return paths


def save_npz(images: Tensor | np.ndarray, path: str | os.PathLike, labels: Tensor | None = None) -> Path:
    """`uint8 [N, H, W, 3]` under key `arr_0` (what the ADM evaluation suite reads); labels, if given, as `labels`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = images if isinstance(images, np.ndarray) else to_uint8(images)
    arrays = {"arr_0": pixels}
    if labels is not None:
        arrays["labels"] = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64)
    np.savez(path, **arrays)
    return path
