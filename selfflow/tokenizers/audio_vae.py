"""Audio tokens cut from the latents of a published audio VAE (`AutoencoderOobleck`, the Stable
Audio VAE: `selfflow.tokenizers.autoencoders`), loaded from a local folder.

The VAE turns every `hop` waveform samples (the product of its downsampling ratios) into one latent
frame; a clip is padded with silence to whole latent frames and the decoded wave cut back to the
clip. Tokens are `patch_frames` latent frames each, with ids (t, 0, 0, 0) in latent time.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

from selfflow.tokenizers.audio import as_mono_batch, limit_peak
from selfflow.tokenizers.autoencoders import FrozenVae, VaeLatentTokenizer
from selfflow.tokenizers.video import grid_positions
from selfflow.tokens import Tokens

KEY = "tokenizer.audio.vae"


class AudioVaeTokenizer(VaeLatentTokenizer):
    """Mono waves [B, 1, S] <-> tokens [B, L / pf, C' pf] of the VAE latent [B, C', L].

    While in training mode the latent is a posterior sample (mean + std * noise), otherwise the
    mean. `encode` also takes cached latents [B, C', L] (`selfflow-cache`). Mono clips are repeated
    to the VAE's channels (Stable Audio: stereo); decoded waves are the mean of its channels.

    Args:
        vae: a local folder with a diffusers audio VAE (config.json + safetensors).
        sample_rate: the data's rate; must be the VAE's `sampling_rate`.
        duration: seconds per clip.
        patch_frames: pf, latent frames per token; divides the latent frames L.
        scale / shift: None: 1 and 0 (Oobleck's config has no normalisation); else one number or
            one per latent channel.
        fingerprint: the VAE a checkpoint was trained with; another one is refused (None: computed).
        vae_batch_size: clips per VAE forward.
    """

    modality = "audio"

    def __init__(
        self,
        vae: str | os.PathLike,
        sample_rate: int = 44100,
        duration: float = 1.0,
        patch_frames: int = 1,
        scale=None,
        shift=None,
        fingerprint: str | None = None,
        vae_batch_size: int = 16,
    ):
        super().__init__()
        self.frozen = FrozenVae(vae, "audio", KEY, scale, shift, fingerprint)
        self.fingerprint, self.vae_path = self.frozen.fingerprint, self.frozen.vae_path
        geometry = self.frozen.geometry
        if int(sample_rate) != geometry.sample_rate:
            raise ValueError(
                f"data.dataset.sample_rate={sample_rate}: {KEY}={vae} ({self.frozen.class_name}) "
                f"works at {geometry.sample_rate} Hz; set data.dataset.sample_rate="
                f"{geometry.sample_rate}"
            )
        self.sample_rate, self.num_samples = int(sample_rate), round(sample_rate * duration)
        self.latent_frames = math.ceil(self.num_samples / geometry.time)  # L, the clip padded
        if patch_frames < 1 or self.latent_frames % patch_frames:
            raise ValueError(
                f"tokenizer.audio.patch_frames={patch_frames} must divide the {self.latent_frames} "
                f"latent frames of {duration} s clips ({geometry.time} samples a frame)"
            )
        self.patch_frames, self.vae_batch_size = int(patch_frames), int(vae_batch_size)
        self.latent_shape = (geometry.channels, self.latent_frames)  # (C', L)
        self.token_channels = geometry.channels * self.patch_frames

    def posterior(self, wave: Tensor) -> tuple[Tensor, Tensor]:
        """waves [B, 1, S] or [B, S] -> the posterior (mean, std), each [B, C', L]."""
        wave = as_mono_batch(wave, self.num_samples, "the audio VAE tokenizer")
        padded = F.pad(wave, (0, self.latent_frames * self.frozen.geometry.time - wave.shape[-1]))
        x = repeat(padded, "b s -> b c s", c=self.frozen.geometry.data_channels)
        return self.frozen.posterior(x, self.vae_batch_size)

    def encode_latents(self, z: Tensor) -> Tokens:
        """Latents z [B, C', L] -> tokens [B, L / pf, C' pf] with ids (t, 0, 0, 0)."""
        x = rearrange(self.frozen.normalise(z), "b c (t p) -> b t (c p)", p=self.patch_frames)
        return Tokens(x=x, pos=self.positions(z.shape[0], z.device), modality=self.modality)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """x: [B, L / pf, C' pf] -> waves [B, S], peaks limited to -1 dBFS (`limit_peak`)."""
        z = rearrange(x.float(), "b t (c p) -> b c (t p)", p=self.patch_frames)
        wave = self.frozen.decode(self.frozen.normalise(z, inverse=True), self.vae_batch_size)
        return limit_peak(wave.mean(1)[:, : self.num_samples])

    def positions(self, batch_size: int, device=None) -> Tensor:
        """[B, L / pf, 4] ids (t, 0, 0, 0)."""
        return grid_positions(self.latent_frames // self.patch_frames, 1, 1, batch_size, device)
