"""Files written for tests: image, audio and video class folders, tar shards, encoded images, a tiny
VAE folder."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from selfflow.io.video import write_mp4


def write_images(root: Path, per_class: int = 4) -> None:
    """Random RGB images of different sizes and formats in two class folders (crop and resize
    both matter)."""
    rng = np.random.default_rng(0)
    for _c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            height, width = 12 + 3 * i, 20 - 2 * i
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")


def write_folder(root, classes=("cat", "dog"), per_class=3, size=(20, 12)):
    """Flat-colour PNGs, one grey level per image, in class folders."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((size[1], size[0], 3), 40 * c + 10 * i, dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def write_noise_images(root: Path, per_class: int = 11) -> Path:
    """Two classes of random 12x12 RGB images: 19 training images, 2 batches of 8 per epoch
    (many epochs)."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
                root / name / f"{i}.png"
            )
    return root


def png_bytes(value: int) -> bytes:
    """An encoded 8x8 PNG of grey level `value`."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    """A sine of `freq` Hz: float32 [seconds * rate]."""
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(
        np.float32
    )


def write_recordings(root: Path) -> None:
    """WAV, FLAC (stereo) and OGG at three rates, longer and shorter than the clip."""
    for c, name in enumerate(("high", "low")):
        (root / name).mkdir(parents=True)
        soundfile.write(root / name / "a.wav", tone(300 + 500 * c, 1.7, 8000), 8000)
        stereo = np.stack([tone(700, 2.0, 16000), tone(900 + c, 2.0, 16000)], axis=1)
        soundfile.write(root / name / "b.flac", stereo, 16000)
        soundfile.write(root / name / "c.ogg", tone(1000 - 300 * c, 0.6, 22050), 22050)


def write_videos(root: Path, per_class: int = 2) -> None:
    """Random-noise MP4s (10 frames, 40x32) in two class folders."""
    rng = np.random.default_rng(1)
    for _c, name in enumerate(("walk", "wave")):
        for i in range(per_class):
            frames = rng.integers(0, 256, (10, 32, 40, 3), dtype=np.uint8)
            write_mp4(frames, root / name / f"{i}.mp4", fps=10)


def ramp_video(num_frames: int, size: int = 32, offset: int = 0) -> np.ndarray:
    """Grey frames whose value is offset + 8 * t: uint8 [T, size, size, 3]."""
    values = offset + 8 * np.arange(num_frames, dtype=np.uint8)
    return np.broadcast_to(values[:, None, None, None], (num_frames, size, size, 3)).copy()


def write_video_folder(root, classes=("walk", "wave"), per_class=3, num_frames=20, size=32, fps=10):
    """Lossless grey-ramp MP4s (`ramp_video`, offset 40 per class) in class folders."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_mp4(
                ramp_video(num_frames, size, offset=40 * c), root / name / f"{i}.mp4", fps, crf=0
            )


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    """A tar file holding `members` (name -> bytes) in this order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_tiny_vae(folder: Path, seed: int = 0, latent_channels: int = 4, **config) -> Path:
    """A randomly initialised diffusers AutoencoderKL with 8x downsampling (32x32 images -> 4x4
    latents) and a few thousand weights, written with save_pretrained like a real VAE folder."""
    diffusers = pytest.importorskip("diffusers")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            norm_num_groups=4,
            latent_channels=latent_channels,
            **config,
        )
    with (
        torch.no_grad()
    ):  # posterior std about 0.2, so that the two flips of an image stay apart in a sample
        vae.quant_conv.bias[latent_channels:] = -3.0
    vae.save_pretrained(folder)
    return folder


def write_tiny_dinov2(folder: Path, seed: int = 0, hidden_size: int = 16) -> Path:
    """A randomly initialised DINOv2 of the real architecture (transformers Dinov2Model) at tiny
    sizes, saved with save_pretrained: REPA's encoder in the tests (patch 14, 2 layers)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        patch_size=14,
        image_size=56,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformers.Dinov2Model(config).save_pretrained(folder)
    return folder


# tiny configs of the published video VAE classes (4x space; Wan, CogVideoX, HunyuanVideo 4x time,
# LTX-Video 2x), a few thousand to 50k weights each
TINY_VIDEO_VAES = {
    "AutoencoderKLWan": {
        "base_dim": 8,
        "z_dim": 4,
        "dim_mult": [1, 1, 1],
        "num_res_blocks": 1,
        "temperal_downsample": [True, True],
        "latents_mean": [0.1, -0.2, 0.3, 0.0],
        "latents_std": [0.5, 1.0, 2.0, 4.0],
        "scale_factor_temporal": 4,
        "scale_factor_spatial": 4,
    },
    "AutoencoderKLCogVideoX": {
        "block_out_channels": (8, 8, 8),
        "down_block_types": ("CogVideoXDownBlock3D",) * 3,
        "up_block_types": ("CogVideoXUpBlock3D",) * 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 4,
    },
    "AutoencoderKLHunyuanVideo": {
        "block_out_channels": (8, 8, 8),
        "down_block_types": ("HunyuanVideoDownBlock3D",) * 3,
        "up_block_types": ("HunyuanVideoUpBlock3D",) * 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "spatial_compression_ratio": 4,
        "mid_block_add_attention": False,
    },
    "AutoencoderKLLTXVideo": {
        "block_out_channels": (8, 8),
        "decoder_block_out_channels": (8, 8),
        "down_block_types": ("LTXVideoDownBlock3D",) * 2,
        "latent_channels": 4,
        "layers_per_block": (1, 1, 1),
        "decoder_layers_per_block": (1, 1, 1),
        "spatio_temporal_scaling": (True, False),
        "decoder_spatio_temporal_scaling": (True, False),
        "decoder_inject_noise": (False,) * 3,
        "upsample_residual": (False,) * 2,
        "upsample_factor": (1, 1),
        "downsample_type": ("conv", "conv"),
        "patch_size": 2,
    },
}


def write_tiny_video_vae(folder: Path, seed: int = 0, kind: str = "AutoencoderKLWan", **config):
    """A randomly initialised diffusers video VAE of class `kind` at the tiny sizes of
    TINY_VIDEO_VAES (by default the Wan 2.1 VAE's class: 5 frames of 16x16 -> 2 latent frames of
    4x4, 4 channels, per-channel latents_mean / latents_std in its config), saved with
    save_pretrained like a published VAE folder."""
    diffusers = pytest.importorskip("diffusers")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        getattr(diffusers, kind)(**{**TINY_VIDEO_VAES[kind], **config}).save_pretrained(folder)
    return folder


def write_tiny_audio_vae(folder: Path, seed: int = 0, **config) -> Path:
    """A randomly initialised diffusers AutoencoderOobleck (the Stable Audio VAE's class), mono at
    8 kHz, 8 samples a latent frame (1 s -> 1000 frames of 4 channels), a few thousand weights,
    saved with save_pretrained."""
    diffusers = pytest.importorskip("diffusers")
    options = {
        "encoder_hidden_size": 8,
        "downsampling_ratios": [2, 4],
        "channel_multiples": [1, 2],
        "decoder_channels": 4,
        "decoder_input_channels": 4,
        "audio_channels": 1,
        "sampling_rate": 8000,
        **config,
    }
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        diffusers.AutoencoderOobleck(**options).save_pretrained(folder)
    return folder
