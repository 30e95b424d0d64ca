"""Image tokens cut from the latents of a frozen VAE (SD-VAE, FLUX VAE): a diffusers `AutoencoderKL`
loaded from a local folder, latents normalised as `(z - shift) * scale`, patches in (c p q) order on
a row-major grid (the layout of the released Self-Flow ImageNet model), position ids (0, h, w, 0).
"""

from __future__ import annotations

import os

import torch
from einops import rearrange
from torch import Tensor

from selfflow.io.model_folders import downsampling, vae_folder
from selfflow.tokenizers.autoencoders import load_autoencoder
from selfflow.tokenizers.base import Tokenizer
from selfflow.tokenizers.image import ImagePatchTokenizer
from selfflow.tokenizers.pretrained import check_part
from selfflow.tokens import Tokens

KEY = "tokenizer.image.vae"


class ImageLatentTokenizer(Tokenizer):
    """Images [B, 3, S, S] in [0, 1] <-> tokens [B, (S / f p)^2, C p p] of the VAE latent z: [B, C,
    S/f, S/f].

    While the tokenizer is in training mode, z is drawn from the VAE's posterior (mean + std *
    noise, as REPA); otherwise (probing, evaluation) z is the posterior mean. `encode` also takes
    latents [B, C, S/f, S/f] drawn from a latent cache (`selfflow-cache`); a VAE downsamples (f >=
    2), so images and latents never share a shape.
    scale / shift: null reads the VAE config's `scaling_factor` / `shift_factor` (0 without one).
    fingerprint: the VAE a checkpoint was trained with; another VAE in `vae` is refused (null:
    computed). The VAE is held outside the module's parameters and state, so checkpoints never
    store it.
    """

    modality = "image"

    def __init__(
        self,
        vae: str | os.PathLike,
        image_size: int = 256,
        patch_size: int = 2,
        latent_channels: int | None = None,
        scale: float | None = None,
        shift: float | None = None,
        fingerprint: str | None = None,
        decode_batch_size: int = 16,
    ):
        super().__init__()
        self.fingerprint = check_part(vae, fingerprint, "vae", KEY)  # before it is loaded
        self.vae_path = str(
            vae_folder(vae, KEY)
        )  # resolved: checkpoints name it from any working folder
        autoencoder = load_autoencoder(vae, KEY)
        self._vae = [
            autoencoder
        ]  # a list: not a submodule, so never in state_dict() or parameters()
        channels, factor = int(autoencoder.config.latent_channels), downsampling(vae, KEY)
        if latent_channels is not None and latent_channels != channels:
            raise ValueError(
                f"{KEY}={vae} has {channels} latent channels, not tokenizer.image.latent_channels="
                f"{latent_channels}; pick the tokenizer config of this VAE (image_sdvae: 4, "
                f"image_flux_vae: 16)"
            )
        if factor < 2 or image_size % factor:
            raise ValueError(
                f"data.dataset.image_size={image_size} must be a multiple of the VAE's "
                f"downsampling factor {factor} (of {KEY}={vae})"
            )
        config_shift = getattr(autoencoder.config, "shift_factor", None)
        self.scale = float(autoencoder.config.scaling_factor if scale is None else scale)
        self.shift = float((config_shift or 0.0) if shift is None else shift)
        self.image_size = (
            int(image_size),
            int(image_size),
        )  # (h, w) pixels, as the pixel tokenizer's
        self.patch_size, self.decode_batch_size = int(patch_size), decode_batch_size
        self.latent_shape = (channels, image_size // factor, image_size // factor)
        self.patches = ImagePatchTokenizer(patch_size, channels, image_size // factor)
        self.grid = self.patches.grid
        self.token_channels = self.patches.token_channels

    @property
    def vae(self):
        return self._vae[0]

    def _apply(self, fn, recurse=True):
        """Move (or cast) the VAE with the tokenizer, although it is not a submodule."""
        self.vae._apply(fn)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, 3, S, S] in [0, 1] -> the posterior's (mean, std), each [B, C, S/f,
        S/f] float32."""
        device = self.vae.device
        with torch.autocast(device_type=device.type, enabled=False):
            dist = self.vae.encode(images.to(device, self.vae.dtype) * 2 - 1).latent_dist
        return dist.mean.float(), dist.std.float()

    def encode_latents(self, z: Tensor) -> Tokens:
        """Latents z [B, C, h, w] -> tokens [B, (h/p)(w/p), C p p]."""
        x = rearrange(
            (z.float() - self.shift) * self.scale,
            "b c (h p) (w q) -> b (h w) (c p q)",
            p=self.patch_size,
            q=self.patch_size,
        )
        return Tokens(x=x, pos=self.positions(z.shape[0], z.device), modality=self.modality)

    def encode(self, data: Tensor) -> Tokens:
        """Images [B, 3, S, S] in [0, 1], or latents [B, C, S/f, S/f] from a latent cache
        -> tokens."""
        if tuple(data.shape[1:]) == self.latent_shape:
            return self.encode_latents(data)
        if tuple(data.shape[1:]) != (3, *self.image_size):
            (c, h, w), (height, width) = self.latent_shape, self.image_size
            raise ValueError(
                f"the image latent tokenizer takes images [B, 3, {height}, {width}] "
                f"or cached latents [B, {c}, {h}, {w}], got {list(data.shape)}; set "
                f"data.dataset.image_size to the size the tokenizer was built for"
            )
        mean, std = self.posterior(data)
        z = mean + std * torch.randn_like(std) if self.training else mean
        return self.encode_latents(z.to(data.device))

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """x: [B, N, C p p] -> images [B, 3, S, S] in [0, 1] (decoded `decode_batch_size` at
        a time)."""
        gh, gw = self.grid
        latents = (
            rearrange(
                x.float(),
                "b (h w) (c p q) -> b c (h p) (w q)",
                h=gh,
                w=gw,
                p=self.patch_size,
                q=self.patch_size,
            )
            / self.scale
            + self.shift
        )
        device = self.vae.device
        with torch.autocast(device_type=device.type, enabled=False):
            images = torch.cat(
                [
                    self.vae.decode(part.to(device, self.vae.dtype)).sample.float()
                    for part in latents.split(self.decode_batch_size)
                ]
            )
        return ((images.to(x.device) + 1) / 2).clamp(0, 1)

    def positions(self, batch_size: int, device=None) -> Tensor:
        return self.patches.positions(batch_size, device)
