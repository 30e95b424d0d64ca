"""SD-VAE latent tokens, the space of the released Self-Flow ImageNet model: a diffusers `AutoencoderKL` loaded
from a local folder (never downloaded), latents scaled by 0.18215, patches in (c p q) order on a row-major grid.

Needs the optional extra: pip install 'selfflow[vae]'.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor

from selfflow.tokenizers.base import Tokenizer
from selfflow.tokens import Tokens
from selfflow.tokenizers.image import ImagePatchTokenizer

SD_VAE_SCALE = 0.18215


def load_autoencoder(folder: str | os.PathLike):
    """A diffusers AutoencoderKL from a local folder (config.json + weights), in eval mode and frozen."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as error:
        raise ValueError(f"vae=... needs diffusers: pip install 'selfflow[vae]' ({error})") from error
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"vae={folder} is not a diffusers AutoencoderKL folder (no config.json); save one "
                                f"with AutoencoderKL.save_pretrained(folder) and pass that folder")
    return AutoencoderKL.from_pretrained(str(folder), local_files_only=True).eval().requires_grad_(False)


class SDVAETokenizer(Tokenizer):
    """Images [B, 3, H, W] in [0, 1] <-> latent tokens [B, grid^2, C p p] (C = latent_channels)."""

    modality = "image"

    def __init__(self, vae: str | os.PathLike, grid: int = 16, patch_size: int = 2, latent_channels: int = 4,
                 scale: float = SD_VAE_SCALE):
        super().__init__()
        self.vae = load_autoencoder(vae)
        if self.vae.config.latent_channels != latent_channels:
            raise ValueError(f"the VAE in {vae} has {self.vae.config.latent_channels} latent channels; the model "
                             f"expects {latent_channels}")
        self.patches = ImagePatchTokenizer(patch_size, latent_channels, grid * patch_size)
        self.grid, self.patch_size, self.scale = grid, patch_size, scale
        self.token_channels = self.patches.token_channels

    def encode(self, images: Tensor) -> Tokens:
        latents = self.vae.encode(images * 2 - 1).latent_dist.mean * self.scale  # [B, C, grid p, grid p]
        x = rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=self.patch_size, q=self.patch_size)
        return Tokens(x=x, pos=self.positions(len(images), images.device), modality=self.modality)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """x: [B, grid^2, C p p] -> images [B, 3, H, W] in [0, 1]."""
        latents = rearrange(x, "b (h w) (c p q) -> b c (h p) (w q)", h=self.grid, w=self.grid, p=self.patch_size,
                            q=self.patch_size)
        images = self.vae.decode(latents.to(self.vae.dtype) / self.scale).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    def positions(self, batch_size: int, device=None) -> Tensor:
        return self.patches.positions(batch_size, device)
