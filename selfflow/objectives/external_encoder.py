"""A frozen external image encoder (DINOv2 through `transformers`) from a local folder, for REPA.

The encoder is never part of a checkpoint: it is held outside the module tree (no parameters, no
state_dict entries) and recorded by the fingerprint of its files, as a VAE is
(`selfflow.io.model_folders`), so that a resume with another encoder is refused by name while the
same encoder in another folder is accepted.

Needs the optional extra: pip install 'selfflow[text]' (transformers).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from selfflow.io.model_folders import MAX_CONFIG_BYTES, folder_fingerprint

KEY = "objective.encoder"
# the normalisation DINOv2 (and REPA's preprocessing of its inputs) uses
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def encoder_folder(folder: str | os.PathLike, key: str = KEY) -> Path:
    """The resolved folder, refused in one line (naming `key`) unless it holds a saved
    `transformers` model."""
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{key}={path} is not a transformers model folder (no config.json); save DINOv2 with "
            f"Dinov2Model.from_pretrained(...).save_pretrained(folder) and pass that folder"
        )
    if (path / "config.json").stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{key}={path}: config.json is larger than {MAX_CONFIG_BYTES} bytes")
    return path.resolve()


def load_dinov2(folder: Path, key: str = KEY) -> nn.Module:
    """A `transformers` Dinov2Model from a local folder (nothing is downloaded), eval mode,
    frozen."""
    try:
        from transformers import Dinov2Model
    except ImportError:
        needs = f"{key}=... needs transformers: pip install 'selfflow[text]'"
        raise ModuleNotFoundError(needs) from None
    try:  # real weights also while start-up checks build the run on the meta device
        with torch.device("cpu"):
            model = Dinov2Model.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).splitlines()[0] if str(error) else ""
        why = f"{type(error).__name__}: {first}"
        raise ValueError(f"{key}={folder}: cannot load a DINOv2 model ({why})") from error
    return model.eval().requires_grad_(False)


class ExternalEncoder(nn.Module):
    """Patch features of clean images from a frozen DINOv2, on a grid of the student's size.

    Args:
        folder: a local folder with a `transformers` Dinov2Model (config.json and weights).
        fingerprint: the encoder a checkpoint was trained with; another one in `folder` is refused
            (None: computed).
        resolution: the encoder's input side in pixels (None: patch size x the student's grid, so
            that its patches match the student's tokens one to one: 224 for a 16 x 16 grid at
            patch 14, as REPA).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        fingerprint: str | None = None,
        resolution: int | None = None,
    ):
        super().__init__()
        path = encoder_folder(folder)
        found = folder_fingerprint(path)
        if fingerprint is not None and found != fingerprint:
            raise ValueError(
                f"{KEY}={folder} holds another encoder (fingerprint {found[:16]}) than the one "
                f"this run was trained with ({str(fingerprint)[:16]}); point {KEY} at that "
                f"encoder's folder"
            )
        self.fingerprint, self.path = found, str(path)
        self._encoder = [load_dinov2(path)]  # a list: not a submodule, never in state_dict()
        config = self.encoder.config
        self.feature_dim, self.patch_size = int(config.hidden_size), int(config.patch_size)
        self.resolution = resolution
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN)[:, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD)[:, None, None], persistent=False)

    @property
    def encoder(self) -> nn.Module:
        return self._encoder[0]

    def _apply(self, fn, recurse=True):
        """Move (or cast) the encoder with this module, although it is not a submodule."""
        self.encoder._apply(fn)
        return super()._apply(fn, recurse)

    def input_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        """(height, width) in pixels the images are resized to for a student grid (gh, gw)."""
        if self.resolution is not None:
            return int(self.resolution), int(self.resolution)
        return grid[0] * self.patch_size, grid[1] * self.patch_size

    @torch.no_grad()
    def forward(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """images: [B, C, H, W] in [0, 1] (C = 1 or 3) -> patch features [B, gh * gw, z_dim],
        float32.

        Resized (bicubic) to the encoder's input size and normalised as DINOv2 expects; its
        normalised patch tokens (CLS left out) are interpolated to the student's grid when their
        grid differs.
        """
        x = images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()
        height, width = self.input_size(grid)
        x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        with torch.autocast(device_type=x.device.type, enabled=False):
            hidden = self.encoder(pixel_values=x).last_hidden_state  # [B, 1 + h * w, z]
        gh, gw = height // self.patch_size, width // self.patch_size
        patches = rearrange(hidden[:, 1 : 1 + gh * gw], "b (h w) z -> b z h w", h=gh, w=gw)
        if (gh, gw) != tuple(grid):
            patches = F.interpolate(patches, size=tuple(grid), mode="bilinear", align_corners=False)
        return rearrange(patches, "b z h w -> b (h w) z").float()
