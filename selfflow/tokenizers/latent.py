"""Latent tokenizers: a frozen autoencoder loaded from a local TorchScript file, with tokens cut
from its latents.

The autoencoder file is a `torch.jit.save`d module with two methods (nothing is downloaded):
  video: `encode(x: [B, T, C, H, W] in [-1, 1]) -> z: [B, T', C', H', W']`, `decode(z) -> x`;
  audio: `encode(wave: [B, S]) -> z: [B, C', L]`, `decode(z) -> wave: [B, S] or [B, 1, S]`.
Latents are normalised as `(z - shift) * scale` before they become tokens.

The file's fingerprint (sha256) is computed before it is loaded: a checkpoint stores it, and a model
rebuilt from a checkpoint loads only a file the user names whose fingerprint is the stored one
(`selfflow.tokenizers.pretrained`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor

from selfflow.tokenizers.audio import as_mono_batch, limit_peak
from selfflow.tokenizers.base import Tokenizer
from selfflow.tokenizers.pretrained import check_part
from selfflow.tokenizers.video import from_tubelets, grid_positions, to_tubelets, tubelet_grid
from selfflow.tokens import Tokens


def load_autoencoder(
    path: str | os.PathLike, key: str, fingerprint: str | None = None
) -> tuple[torch.jit.ScriptModule, str]:
    """A frozen TorchScript autoencoder from a local file and its fingerprint, checked against
    `fingerprint` (when given) before the file is loaded; errors name the file and the config key
    `key`."""
    path = Path(path).expanduser()
    found = check_part(path, fingerprint, "autoencoder_path", key)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:
        raise ValueError(
            f"{key}={path} is not a loadable TorchScript module: {type(error).__name__}: {error}"
        ) from error
    for method in ("encode", "decode"):
        if not hasattr(module, method):
            raise ValueError(
                f"{key}={path} has no {method}() method; export a module with encode() and decode()"
            )
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module, found


class VideoLatentTokenizer(Tokenizer):
    """Clips [B, T, C, H, W] in [0, 1] -> autoencoder latents [B, T', C', H', W'] -> tubelets of the
    latent with ids (t, h, w, 0). The latent shape is read off one encode of a blank clip at
    construction.
    fingerprint: the autoencoder a checkpoint was trained with; another file is refused before
    it loads."""

    modality = "video"

    def __init__(
        self,
        autoencoder_path: str,
        tubelet_frames: int = 1,
        patch_size: int = 1,
        channels: int = 3,
        num_frames: int = 8,
        image_size: int = 64,
        fps: float = 8.0,
        scale: float = 1.0,
        shift: float = 0.0,
        fingerprint: str | None = None,
    ):
        super().__init__()
        key = "tokenizer.video.autoencoder_path"
        self.autoencoder, self.fingerprint = load_autoencoder(autoencoder_path, key, fingerprint)
        self.tubelet_frames, self.patch_size, self.fps = tubelet_frames, patch_size, fps
        self.sample_shape = (num_frames, channels, image_size, image_size)
        self.scale, self.shift = scale, shift
        with torch.no_grad():
            latent = self.autoencoder.encode(torch.zeros(1, *self.sample_shape))
        if latent.ndim != 5:
            raise ValueError(
                f"tokenizer.video.autoencoder_path: encode() gave latents of shape "
                f"{list(latent.shape)}; a video autoencoder must give [B, T', C', H', W']"
            )
        t, c, h, w = latent.shape[1:]
        self.grid = tubelet_grid((t, h, w), tubelet_frames, patch_size, "autoencoder latents")
        self.token_channels = c * tubelet_frames * patch_size * patch_size

    def encode(self, video: Tensor) -> Tokens:
        if tuple(video.shape[1:]) != self.sample_shape:
            raise ValueError(
                f"video latent tokenizer expects [B, {', '.join(map(str, self.sample_shape))}], "
                f"got {list(video.shape)}; the tokenizer takes num_frames, channels and image_size "
                "from data.dataset (a mixture: data.sources.video.dataset)"
            )
        with torch.no_grad():
            latent = self.autoencoder.encode(video * 2 - 1)
        x = to_tubelets((latent - self.shift) * self.scale, self.tubelet_frames, self.patch_size)
        return Tokens(x=x, pos=self.positions(video.shape[0], video.device), modality=self.modality)

    def decode(self, x: Tensor) -> Tensor:
        """x: [B, N, C' pt p p] -> clips [B, T, C, H, W] in [0, 1]."""
        latent = (
            from_tubelets(x, self.grid, self.tubelet_frames, self.patch_size) / self.scale
            + self.shift
        )
        return ((self.autoencoder.decode(latent) + 1) / 2).clamp(0, 1)

    def positions(self, batch_size: int, device=None) -> Tensor:
        return grid_positions(*self.grid, batch_size, device)


class AudioLatentTokenizer(Tokenizer):
    """Waves [B, 1, S] -> autoencoder latents [B, C', L] -> tokens of `patch_frames` latent frames,
    ids (t, 0, 0, 0).
    fingerprint: the autoencoder a checkpoint was trained with; another file is refused before
    it loads."""

    modality = "audio"

    def __init__(
        self,
        autoencoder_path: str,
        sample_rate: int = 8000,
        duration: float = 1.0,
        patch_frames: int = 1,
        scale: float = 1.0,
        shift: float = 0.0,
        fingerprint: str | None = None,
    ):
        super().__init__()
        key = "tokenizer.audio.autoencoder_path"
        self.autoencoder, self.fingerprint = load_autoencoder(autoencoder_path, key, fingerprint)
        self.sample_rate, self.num_samples = int(sample_rate), round(sample_rate * duration)
        self.patch_frames, self.scale, self.shift = patch_frames, scale, shift
        with torch.no_grad():
            latent = self.autoencoder.encode(torch.zeros(1, self.num_samples))
        if latent.ndim != 3 or patch_frames < 1 or latent.shape[-1] % patch_frames:
            raise ValueError(
                f"tokenizer.audio: the autoencoder's latents {list(latent.shape)} must be [B, C', "
                f"L] with L divisible by patch_frames={patch_frames}"
            )
        self.latent_frames = latent.shape[-1]
        self.token_channels = latent.shape[1] * patch_frames

    def encode(self, wave: Tensor) -> Tokens:
        wave = as_mono_batch(wave, self.num_samples, "audio latent tokenizer")
        with torch.no_grad():
            latent = self.autoencoder.encode(wave)
        x = rearrange(
            (latent - self.shift) * self.scale, "b c (t p) -> b t (c p)", p=self.patch_frames
        )
        return Tokens(x=x, pos=self.positions(wave.shape[0], wave.device), modality=self.modality)

    def decode(self, x: Tensor) -> Tensor:
        """x: [B, L / pf, C' pf] -> waves [B, S], peaks limited to -1 dBFS (`limit_peak`)."""
        latent = (
            rearrange(x, "b t (c p) -> b c (t p)", p=self.patch_frames) / self.scale + self.shift
        )
        wave = self.autoencoder.decode(latent)
        return limit_peak(wave.reshape(wave.shape[0], -1))

    def positions(self, batch_size: int, device=None) -> Tensor:
        return grid_positions(self.latent_frames // self.patch_frames, 1, 1, batch_size, device)
