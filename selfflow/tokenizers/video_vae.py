"""Video tokens cut from the latents of a published video VAE (`AutoencoderKLWan`, CogVideoX,
HunyuanVideo, LTX-Video: `selfflow.tokenizers.autoencoders`), loaded from a local folder.

A causal video VAE encodes the first frame alone and each later group of `time` frames into one
latent frame: Wan turns 1 + 4k frames into 1 + k latent frames. Tokens are tubelets of the
normalised latent, and their position ids count LATENT frames: (t, h, w, 0) with t the tubelet index
along latent time. `decode` goes back to the frames the VAE makes of those latents.
"""

from __future__ import annotations

import copy
import os

import torch
from einops import rearrange, repeat
from torch import Tensor

from selfflow.tokenizers.autoencoders import FrozenVae, VaeLatentTokenizer
from selfflow.tokenizers.video import from_tubelets, grid_positions, to_tubelets, tubelet_grid
from selfflow.tokens import Tokens

KEY = "tokenizer.video.vae"


class VideoVaeTokenizer(VaeLatentTokenizer):
    """Clips [B, T, C, H, W] in [0, 1] <-> tokens [B, (T'/pt)(h/p)(w/p), C' pt p p] of the VAE
    latent [B, C', T', h, w] (T' latent frames of h x w).

    While in training mode the latent is a posterior sample (mean + std * noise), otherwise the
    mean. `encode` also takes cached latents [B, C', T', h, w] (`selfflow-cache`). Grey clips
    (C = 1) are repeated to the VAE's RGB input and decoded back to grey by the mean of the
    channels.

    Args:
        vae: a local folder with a diffusers video VAE (config.json + safetensors).
        tubelet_frames: pt, latent frames per token; divides the latent frames.
        patch_size: p, latent positions per token side; divides h and w.
        channels: C, the channels of the data's frames (1 or the VAE's input channels).
        num_frames: T, the data's frames; the VAE must encode that many (Wan: 1 + 4k).
        image_size: H = W, a multiple of the VAE's spatial factor.
        fps: the rate samples are written at (None: 8).
        scale / shift: None: the VAE config's (Wan: 1 / latents_std and latents_mean per channel;
            CogVideoX and HunyuanVideo: scaling_factor); else one number or one per channel.
        fingerprint: the VAE a checkpoint was trained with; another one is refused (None: computed).
        vae_batch_size: clips per VAE forward.
    """

    modality = "video"

    def __init__(
        self,
        vae: str | os.PathLike,
        tubelet_frames: int = 1,
        patch_size: int = 2,
        channels: int = 3,
        num_frames: int = 17,
        image_size: int = 256,
        fps: float | None = 8.0,
        scale=None,
        shift=None,
        fingerprint: str | None = None,
        vae_batch_size: int = 4,
    ):
        super().__init__()
        self.frozen = FrozenVae(vae, "video", KEY, scale, shift, fingerprint)
        self.fingerprint, self.vae_path = self.frozen.fingerprint, self.frozen.vae_path
        geometry = self.frozen.geometry
        if channels not in (1, geometry.data_channels):
            raise ValueError(
                f"data.dataset.channels={channels}: {KEY}={vae} ({self.frozen.class_name}) takes "
                f"{geometry.data_channels}-channel frames (or grey ones, repeated); set "
                f"data.dataset.channels={geometry.data_channels}"
            )
        if image_size % geometry.space or image_size // geometry.space < 1:
            raise ValueError(
                f"data.dataset.image_size={image_size} must be a multiple of {geometry.space}, the "
                f"spatial factor of {KEY}={vae} ({self.frozen.class_name})"
            )
        self.tubelet_frames, self.patch_size, self.channels = tubelet_frames, patch_size, channels
        self.image_size, self.fps = int(image_size), float(fps) if fps else 8.0
        self.vae_batch_size = int(vae_batch_size)
        self._set_frames(num_frames)
        self.token_channels = geometry.channels * tubelet_frames * patch_size * patch_size

    def _set_frames(self, num_frames: int) -> None:
        """Latent frames and the token grid of clips of `num_frames` frames, or a one-line
        refusal."""
        geometry = self.frozen.geometry
        latent_frames = geometry.latent_steps(int(num_frames))
        if latent_frames is None or num_frames != int(num_frames):
            raise ValueError(
                f"data.dataset.num_frames={num_frames}: {KEY} ({self.frozen.class_name}) encodes "
                f"{geometry.rule()} frames; set data.dataset.num_frames to one of "
                f"{', '.join(map(str, geometry.valid_steps()))}, ..."
            )
        side = self.image_size // geometry.space
        self.num_frames = int(num_frames)
        self.latent_shape = (geometry.channels, latent_frames, side, side)  # (C', T', h, w)
        shape = (latent_frames, side, side)
        self.grid = tubelet_grid(shape, self.tubelet_frames, self.patch_size, "VAE latents")

    def at_frames(self, num_frames: int) -> VideoVaeTokenizer:
        """The same tokenizer for clips of `num_frames` frames (sampling another length).

        Args:
            num_frames: a frame count the VAE encodes whose latent frames are whole tubelets.

        Returns:
            This tokenizer when the length is unchanged, otherwise a shallow copy.
        """
        if num_frames == self.num_frames:
            return self
        other = copy.copy(self)
        other._set_frames(num_frames)
        return other

    at_length = at_frames  # selfflow-sample frames=...

    def to_vae_input(self, video: Tensor) -> Tensor:
        """clips [B, T, C, H, W] in [0, 1] -> the VAE's input [B, C_vae, T, H, W] in [-1, 1]."""
        x = rearrange(video.float() * 2 - 1, "b t c h w -> b c t h w")
        wanted = self.frozen.geometry.data_channels
        return repeat(x, "b 1 t h w -> b c t h w", c=wanted) if x.shape[1] != wanted else x

    def posterior(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """clips [B, T, C, H, W] in [0, 1] -> the posterior (mean, std), each [B, C', T', h, w]."""
        self.check_clips(video)
        return self.frozen.posterior(self.to_vae_input(video), self.vae_batch_size)

    def check_clips(self, video: Tensor) -> None:
        expected = (self.num_frames, self.channels, self.image_size, self.image_size)
        if tuple(video.shape[1:]) != expected:
            latent = ", ".join(map(str, self.latent_shape))
            raise ValueError(
                f"the video VAE tokenizer takes clips [B, {', '.join(map(str, expected))}] or "
                f"cached latents [B, {latent}], got {list(video.shape)}; set data.dataset."
                f"num_frames/channels/image_size to what the tokenizer was built for"
            )

    def encode_latents(self, z: Tensor) -> Tokens:
        """Latents z [B, C', T', h, w] -> tokens [B, N, C' pt p p] with ids in latent time."""
        frames = rearrange(self.frozen.normalise(z), "b c t h w -> b t c h w")
        x = to_tubelets(frames, self.tubelet_frames, self.patch_size)
        return Tokens(x=x, pos=self.positions(z.shape[0], z.device), modality=self.modality)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """x: [B, N, C' pt p p] -> clips [B, T, C, H, W] in [0, 1] (T from the latent frames)."""
        per_step = self.grid[1] * self.grid[2]
        if x.shape[1] % per_step or not x.shape[1]:
            raise ValueError(f"{x.shape[1]} video tokens are not whole latent frames of {per_step}")
        grid = (x.shape[1] // per_step, *self.grid[1:])
        frames = from_tubelets(x.float(), grid, self.tubelet_frames, self.patch_size)
        z = self.frozen.normalise(rearrange(frames, "b t c h w -> b c t h w"), inverse=True)
        video = self.frozen.decode(z, self.vae_batch_size)  # [B, C_vae, T, H, W]
        video = rearrange((video + 1) / 2, "b c t h w -> b t c h w").clamp(0, 1)
        return video.mean(2, keepdim=True) if self.channels == 1 else video

    def positions(self, batch_size: int, device=None) -> Tensor:
        """[B, N, 4] ids (t, h, w, 0), t counting latent tubelets along latent time."""
        return grid_positions(*self.grid, batch_size, device)
