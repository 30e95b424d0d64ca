"""Writing samples to files a person can open, and to the arrays metric suites read."""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from selfflow.io.safe_files import replace_atomically


def quantize(samples: Tensor) -> Tensor:
    """Samples in [0, 1] (images [B, C, H, W], any layout) -> uint8 0..255, rounded: what every
    image file holds."""
    return (samples.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def rgb_rows(pixels: Tensor | np.ndarray) -> np.ndarray:
    """uint8 [B, C, H, W] -> uint8 [B, H, W, 3] on the CPU (grey images repeated to RGB)."""
    pixels = torch.as_tensor(pixels)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    return rearrange(pixels, "b c h w -> b h w c").cpu().numpy()


def to_uint8(images: Tensor) -> np.ndarray:
    """[B, C, H, W] in [0, 1] -> uint8 [B, H, W, 3] (grey images repeated to RGB)."""
    return rgb_rows(quantize(images))


def image_grid(
    images: Tensor, nrow: int | None = None, upscale: int = 1, pad: int = 2
) -> Image.Image:
    """A grid of images [B, C, H, W] in [0, 1], upscaled by nearest neighbour so small samples
    are visible."""
    pixels = to_uint8(images)
    b, h, w, _ = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    canvas = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, image in enumerate(pixels):
        r, c = divmod(i, nrow)
        canvas[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + c * (w + pad) : pad + c * (w + pad) + w,
        ] = image
    grid = Image.fromarray(canvas)
    if upscale > 1:
        grid = grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST)
    return grid


def image_format(path: Path) -> str:
    """PIL's format name for a file name's extension (`grid.png` -> PNG)."""
    return Image.registered_extensions().get(path.suffix.lower(), "PNG")


def save_image_grid(
    images: Tensor, path: str | os.PathLike, nrow: int | None = None, upscale: int = 1
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replace_atomically(path) as file:
        image_grid(images, nrow, upscale).save(file, format=image_format(path))
    return path


def save_image_files(
    images: Tensor, folder: str | os.PathLike, names: list[str], upscale: int = 1
) -> list[Path]:
    """One PNG per image [B, C, H, W] in [0, 1], named `names[i].png`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for pixels, name in zip(to_uint8(images), names):
        image = Image.fromarray(pixels)
        if upscale > 1:
            image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
        with replace_atomically(folder / f"{name}.png") as file:
            image.save(file, format="PNG")
        paths.append(folder / f"{name}.png")
    return paths


def write_npz_streamed(
    path: str | os.PathLike,
    blocks: Iterable[np.ndarray],
    shape: tuple[int, ...],
    dtype: np.dtype,
    small: dict[str, np.ndarray],
) -> Path:
    """An .npz whose `arr_0` (of `shape`) is written block by block from `blocks` (row blocks in
    order), then the `small` arrays: what `np.savez(path, arr_0=..., **small)` writes (uncompressed
    zip of .npy members, zip64), with one block in memory at a time instead of the whole array
    (50,000 ImageNet samples are 9.8 GB). Written to a new temporary file and renamed
    (`replace_atomically`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": tuple(shape),
    }
    rows = 0
    with (
        replace_atomically(path) as file,
        zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive,
    ):
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for block in blocks:
                if block.dtype != dtype or block.shape[1:] != tuple(shape[1:]):
                    raise ValueError(
                        f"a block of {block.dtype} {list(block.shape)} for "
                        f"{path}[arr_0] of {dtype} {list(shape)}"
                    )
                member.write(np.ascontiguousarray(block).data)
                rows += len(block)
        if rows != shape[0]:
            raise ValueError(f"{path}[arr_0] promised {shape[0]} rows, the blocks held {rows}")
        for key, array in small.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    return path
