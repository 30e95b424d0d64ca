"""The published video and audio autoencoders selfflow loads, as one table: for each diffusers
class, how its config.json gives the latent geometry (channels, time and space compression, whether
the first frame is encoded alone) and where its latent normalisation lives.

A row reads the config before any weight is loaded, so that a clip length the VAE cannot encode is
refused in one line first. `FrozenVae` holds a loaded autoencoder for a tokenizer: outside the
module's parameters and state (checkpoints never store it), following the tokenizer's device and
dtype.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from selfflow.io.model_folders import read_vae_config, vae_folder
from selfflow.tokenizers.base import Tokenizer
from selfflow.tokenizers.pretrained import check_part
from selfflow.tokens import Tokens


@dataclass(frozen=True)
class LatentGeometry:
    """What one autoencoder does to the axes of a sample.

    channels: latent channels C'. time: frames (video) or waveform samples (audio) per latent step.
    space: pixels per latent position along a side (1 for audio). causal: the first frame is encoded
    alone, so 1 + time * k frames give 1 + k latent frames (else time * k give k).
    data_channels: the channels the autoencoder takes (RGB 3, stereo 2). sample_rate: audio only.
    odd_latents: only an odd count of latent frames decodes back to the frames it was encoded from
    (CogVideoX decodes an even count into `time` frames each).
    """

    channels: int
    time: int
    space: int
    causal: bool
    data_channels: int
    sample_rate: int | None = None
    odd_latents: bool = False

    def latent_steps(self, steps: int) -> int | None:
        """Latent steps of `steps` frames, None when the autoencoder cannot encode (and decode)
        that many."""
        rest = steps - 1 if self.causal else steps
        if rest < 0 or rest % self.time or (not self.causal and not rest):
            return None
        latent = rest // self.time + (1 if self.causal else 0)
        return None if self.odd_latents and latent % 2 == 0 else latent

    def steps(self, latent_steps: int) -> int:
        """Frames decoded from `latent_steps` latent frames (the inverse of `latent_steps`)."""
        return 1 + self.time * (latent_steps - 1) if self.causal else self.time * latent_steps

    def rule(self) -> str:
        """The frame counts this autoencoder encodes, as a formula ("1 + 4k")."""
        period = self.time * (2 if self.odd_latents else 1)
        return f"1 + {period}k" if self.causal else f"{period}k"

    def valid_steps(self, count: int = 4) -> list[int]:
        """The first `count` frame counts this autoencoder encodes (for error messages)."""
        latents = range(1, 2 * count + 1, 2) if self.odd_latents else range(1, count + 1)
        return [self.steps(k) for k in latents]


Normalisation = tuple[Sequence[float] | float, Sequence[float] | float]  # (shift, scale)


@dataclass(frozen=True)
class AutoencoderKind:
    """One diffusers autoencoder class: its modality, its geometry from config.json, and its latent
    normalisation `(z - shift) * scale` (per channel or one number) from the loaded model."""

    modality: str
    geometry: Callable[[dict], LatentGeometry]
    normalisation: Callable[[Any], Normalisation]


def _wan(config: dict) -> LatentGeometry:
    downsample = list(config.get("temperal_downsample", [False, True, True]))
    return LatentGeometry(
        channels=int(config.get("z_dim", 16)),
        time=2 ** sum(bool(d) for d in downsample),
        space=2 ** len(downsample) * int(config.get("patch_size") or 1),
        causal=True,
        data_channels=int(config.get("in_channels", 3)),
    )


def _wan_normalisation(vae) -> Normalisation:
    """Wan's pipelines use (z - latents_mean) / latents_std, per channel."""
    return list(vae.config.latents_mean), [1.0 / s for s in vae.config.latents_std]


def _cogvideox(config: dict) -> LatentGeometry:
    return LatentGeometry(
        channels=int(config.get("latent_channels", 16)),
        time=int(config.get("temporal_compression_ratio", 4)),
        space=2 ** (len(config.get("block_out_channels", [0] * 4)) - 1),
        causal=True,
        data_channels=int(config.get("in_channels", 3)),
        odd_latents=True,
    )


def _hunyuan(config: dict) -> LatentGeometry:
    return LatentGeometry(
        channels=int(config.get("latent_channels", 16)),
        time=int(config.get("temporal_compression_ratio", 4)),
        space=int(config.get("spatial_compression_ratio", 8)),
        causal=True,
        data_channels=int(config.get("in_channels", 3)),
    )


def _ltx(config: dict) -> LatentGeometry:
    scaling = 2 ** sum(bool(s) for s in config.get("spatio_temporal_scaling", [1, 1, 1, 0]))
    time = config.get("temporal_compression_ratio") or int(config.get("patch_size_t", 1)) * scaling
    space = config.get("spatial_compression_ratio") or int(config.get("patch_size", 4)) * scaling
    return LatentGeometry(
        channels=int(config.get("latent_channels", 128)),
        time=int(time),
        space=int(space),
        causal=True,
        data_channels=int(config.get("in_channels", 3)),
    )


def _ltx_normalisation(vae) -> Normalisation:
    """LTX-Video keeps its per-channel statistics as buffers: (z - mean) * scaling_factor / std."""
    factor = float(vae.config.scaling_factor)
    return vae.latents_mean.tolist(), [factor / float(s) for s in vae.latents_std.tolist()]


def _scaling_factor(vae) -> Normalisation:
    """CogVideoX, HunyuanVideo: z * scaling_factor (minus shift_factor where the config has one)."""
    return float(getattr(vae.config, "shift_factor", None) or 0.0), float(vae.config.scaling_factor)


def _oobleck(config: dict) -> LatentGeometry:
    return LatentGeometry(
        channels=int(config.get("decoder_input_channels", 64)),
        time=math.prod(int(r) for r in config.get("downsampling_ratios", [2, 4, 4, 8, 8])),
        space=1,
        causal=False,
        data_channels=int(config.get("audio_channels", 2)),
        sample_rate=int(config.get("sampling_rate", 44100)),
    )


AUTOENCODERS: dict[str, AutoencoderKind] = {
    "AutoencoderKLWan": AutoencoderKind("video", _wan, _wan_normalisation),
    "AutoencoderKLCogVideoX": AutoencoderKind("video", _cogvideox, _scaling_factor),
    "AutoencoderKLHunyuanVideo": AutoencoderKind("video", _hunyuan, _scaling_factor),
    "AutoencoderKLLTXVideo": AutoencoderKind("video", _ltx, _ltx_normalisation),
    "AutoencoderOobleck": AutoencoderKind("audio", _oobleck, lambda vae: (0.0, 1.0)),
}


def classes_of(modality: str) -> tuple[str, ...]:
    """The diffusers classes of `modality` in the table."""
    return tuple(name for name, kind in AUTOENCODERS.items() if kind.modality == modality)


def folder_geometry(
    folder: str | os.PathLike,
    modality: str,
    key: str,
) -> tuple[str, LatentGeometry]:
    """(class name, geometry) of the autoencoder in `folder`, from its config.json alone.

    Args:
        folder: the VAE folder the user named.
        modality: "video" or "audio": the classes accepted.
        key: the config key named in refusals.

    Returns:
        The folder's diffusers class and its latent geometry.
    """
    classes = classes_of(modality)
    config = read_vae_config(folder, key, " or ".join(classes))
    name = config.get("_class_name")
    if name not in classes:
        raise ValueError(
            f"{key}={folder} holds a diffusers {name or 'model without _class_name'}; the "
            f"{modality} "
            f"VAE tokenizer loads {', '.join(classes)} (save one with save_pretrained)"
        )
    try:
        geometry = AUTOENCODERS[name].geometry(config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{key}={folder}: config.json is not a {name} config ({error})") from error
    if geometry.channels < 1 or geometry.time < 1 or geometry.space < 1:
        raise ValueError(f"{key}={folder}: config.json gives latent sizes below 1: {geometry}")
    return name, geometry


def channel_values(value: Sequence[float] | float, channels: int, what: str) -> list[float]:
    """A scale or shift as one number per latent channel (a single number is repeated)."""
    if isinstance(value, (int, float)):
        value = [value] * channels
    values = [float(v) for v in value]
    if len(values) != channels or not all(math.isfinite(v) for v in values):
        wanted = f"one finite number or {channels} (one per latent channel)"
        raise ValueError(f"{what} must be {wanted}, got {value}")
    return values


class FrozenVae(torch.nn.Module):
    """A tokenizer part holding a frozen diffusers autoencoder of the table, checked by fingerprint
    before it loads, never in `state_dict()` or `parameters()`, moved and cast with its owner.

    Args:
        vae: the folder (config.json + safetensors) the user named.
        modality: "video" or "audio".
        key: the config key naming the folder, in refusals.
        scale / shift: None: the VAE's own normalisation (`AUTOENCODERS`); else one number or one
            per latent channel.
        fingerprint: the VAE a checkpoint was trained with; another one is refused (None: computed).
    """

    def __init__(self, vae, modality: str, key: str, scale=None, shift=None, fingerprint=None):
        super().__init__()
        vae_folder(vae, key, " or ".join(classes_of(modality)))  # a missing folder named first
        self.fingerprint = check_part(vae, fingerprint, "vae", key)  # before anything loads
        self.class_name, self.geometry = folder_geometry(vae, modality, key)
        self.vae_path = str(vae_folder(vae, key, self.class_name))  # resolved: any working folder
        self._vae = [load_autoencoder(vae, key, (self.class_name,))]  # a list: not a submodule
        own_shift, own_scale = AUTOENCODERS[self.class_name].normalisation(self.vae)
        channels, where = self.geometry.channels, key.rsplit(".", 1)[0]
        scale, shift = own_scale if scale is None else scale, own_shift if shift is None else shift
        self.scale = channel_values(scale, channels, f"{where}.scale")
        self.shift = channel_values(shift, channels, f"{where}.shift")

    @property
    def vae(self):
        return self._vae[0]

    def _apply(self, fn, recurse=True):
        """Move (or cast) the VAE with the tokenizer, although it is not a submodule."""
        self.vae._apply(fn)
        return super()._apply(fn, recurse)

    def normalise(self, z: Tensor, inverse: bool = False) -> Tensor:
        """z: [B, C', ...] -> (z - shift) * scale per channel (inverse: z / scale + shift)."""
        view = (1, -1) + (1,) * (z.ndim - 2)
        shift = torch.tensor(self.shift, device=z.device).view(view)
        scale = torch.tensor(self.scale, device=z.device).view(view)
        return z.float() / scale + shift if inverse else (z.float() - shift) * scale

    @torch.no_grad()
    def posterior(self, x: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
        """x: the VAE's input layout in [-1, 1] -> its posterior (mean, std), float32, on x's
        device, encoded `batch_size` samples at a time."""
        device = self.vae.device
        means, stds = [], []
        with torch.autocast(device_type=device.type, enabled=False):
            for part in x.split(batch_size):
                dist = self.vae.encode(part.to(device, self.vae.dtype)).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
        return torch.cat(means).to(x.device), torch.cat(stds).to(x.device)

    @torch.no_grad()
    def decode(self, z: Tensor, batch_size: int) -> Tensor:
        """z: latents in the VAE's layout -> its output, float32 on z's device."""
        device = self.vae.device
        with torch.autocast(device_type=device.type, enabled=False):
            parts = [self.vae.decode(p.to(device, self.vae.dtype)) for p in z.split(batch_size)]
        return torch.cat([part.sample.float() for part in parts]).to(z.device)


def load_autoencoder(
    folder: str | os.PathLike,
    key: str = "vae",
    classes: tuple[str, ...] = ("AutoencoderKL",),
):
    """A diffusers autoencoder from a local folder (config.json + weights), in eval mode and frozen.

    Args:
        folder: the VAE folder the user named.
        key: the config key named in refusals.
        classes: the diffusers classes the caller accepts; the folder's `_class_name` picks one (a
            folder without one is taken as the first).

    Returns:
        The loaded autoencoder (a diffusers ModelMixin), parameters frozen.
    """
    kind = " or ".join(classes)
    name = read_vae_config(folder, key, kind).get("_class_name", classes[0])
    if name not in classes:
        raise ValueError(
            f"{key}={folder} holds a diffusers {name}, not a {kind}; pick the tokenizer of that "
            f"kind of autoencoder (docs/data.md lists which class each tokenizer loads)"
        )
    try:
        import diffusers
    except ImportError as error:
        raise ValueError(
            f"{key}=... needs diffusers: pip install 'selfflow[vae]' ({error})"
        ) from error
    path = vae_folder(folder, key, kind)
    try:
        loader = getattr(diffusers, name)  # a name of `classes`, never one the file alone chose
        vae = loader.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as error:
        raise ValueError(
            f"{key}={path}: cannot load a diffusers {name} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})"
        ) from error
    return vae.eval().requires_grad_(False)


def point_vae_keys(config, folder: str | os.PathLike, modality: str | None = None) -> None:
    """The nodes of a run config (dict or DictConfig) that name the VAE of `modality` (its
    tokenizer, and a latent cache of that modality) point at `folder`; None: every node that names
    a VAE.

    Args:
        config: the run config; its `tokenizer.<modality>` and `data.dataset` nodes change.
        folder: the VAE folder, resolved.
        modality: whose VAE this is (a run may have an image VAE and a video VAE).
    """
    data = config.get("data") or {}
    tokenizers = config.get("tokenizer") or {}
    specs = [spec for name, spec in tokenizers.items() if modality in (None, name)]
    if modality in (None, data.get("modality", "image")):
        specs.append(data.get("dataset"))
    for spec in specs:
        if spec is not None and "vae" in spec:
            spec["vae"] = str(folder)


class VaeLatentTokenizer(Tokenizer):
    """What the video and audio VAE tokenizers share: the frozen VAE (`self.frozen`, a `FrozenVae`)
    and its normalisation, and an `encode` that takes samples or latents a cache stored.

    Subclasses set `frozen`, `latent_shape` (one sample's latent shape, without the batch) and
    implement `posterior` (samples -> mean, std) and `encode_latents` (latents -> tokens).
    """

    frozen: FrozenVae
    latent_shape: tuple[int, ...]

    @property
    def vae(self):
        return self.frozen.vae

    @property
    def scale(self) -> list[float]:
        return self.frozen.scale

    @property
    def shift(self) -> list[float]:
        return self.frozen.shift

    def encode(self, data: Tensor) -> Tokens:
        """Samples, or cached latents (told apart by shape) -> tokens; a training draw samples the
        posterior, evaluation takes its mean."""
        if tuple(data.shape[1:]) == self.latent_shape:
            return self.encode_latents(data)
        mean, std = self.posterior(data)
        return self.encode_latents(mean + std * torch.randn_like(std) if self.training else mean)
