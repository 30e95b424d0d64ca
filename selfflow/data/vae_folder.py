"""A frozen diffusers `AutoencoderKL` from a local folder (never downloaded), and the fingerprint of its files.

The fingerprint (sha256 over config.json and the weight files, by name and content) is what a checkpoint and a
latent cache record instead of the weights: a run, a resume, `selfflow-sample` or `selfflow-probe` with a VAE of
other content is refused by name, while the same VAE in another folder is accepted.

Needs the optional extra: pip install 'selfflow[vae]'.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from selfflow.io.digests import file_digest

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
MAX_CONFIG_BYTES = 1 << 20  # a diffusers config.json is a few kB


def vae_folder(folder: str | os.PathLike, key: str = "vae") -> Path:
    """The resolved folder, refused in one line (naming the config `key`) unless it holds a diffusers VAE."""
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{key}={path} is not a diffusers AutoencoderKL folder (no config.json); save one "
            f"with AutoencoderKL.save_pretrained(folder) and pass that folder (nothing is "
            f"downloaded)"
        )
    if (path / "config.json").stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{key}={path}: config.json is larger than {MAX_CONFIG_BYTES} bytes; not a VAE config")
    return path.resolve()


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


@functools.lru_cache(maxsize=16)
def _fingerprint(folder: Path, stats: tuple) -> str:  # stats: part of the cache key, so edited files rehash
    digest = hashlib.sha256()
    for path in [folder / "config.json", *_weight_files(folder)]:
        digest.update(path.name.encode() + b"\0")
        file_digest(path, digest)
    return digest.hexdigest()


def folder_fingerprint(path: Path) -> str:
    """sha256 of a model folder's config.json and weight files, by name and content (computed once
    per process and file state). Used for VAEs and for external encoders alike.

    Args:
        path: a resolved folder holding config.json.

    Returns:
        The hex digest.
    """
    files = [path / "config.json", *_weight_files(path)]
    return _fingerprint(path, tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def vae_fingerprint(folder: str | os.PathLike, key: str = "vae") -> str:
    """sha256 of config.json and the weight files (computed once per process and file state)."""
    return folder_fingerprint(vae_folder(folder, key))


def load_autoencoder(folder: str | os.PathLike, key: str = "vae"):
    """A diffusers AutoencoderKL from a local folder (config.json + weights), in eval mode and frozen."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as error:
        raise ValueError(f"{key}=... needs diffusers: pip install 'selfflow[vae]' ({error})") from error
    path = vae_folder(folder, key)
    try:
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(
            f"{key}={path}: cannot load a diffusers AutoencoderKL ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})"
        ) from error
    return vae.eval().requires_grad_(False)


def latent_geometry(folder: str | os.PathLike, key: str = "vae") -> tuple[int, int]:
    """(latent channels, pixels per latent position along a side) from the VAE's config.json: the
    factor is 2 per down block after the first (8 for SD-VAE and FLUX)."""
    path = vae_folder(folder, key) / "config.json"
    try:
        config = json.loads(path.read_text())
        return int(config.get("latent_channels", 4)), 2 ** (len(config["block_out_channels"]) - 1)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{key}={folder}: {path} has no list block_out_channels ({error}); not an AutoencoderKL config"
        ) from error


def downsampling(folder: str | os.PathLike, key: str = "vae") -> int:
    """Pixels per latent position along a side (`latent_geometry`)."""
    return latent_geometry(folder, key)[1]


def point_vae_keys(config, folder: str | os.PathLike) -> None:
    """Every node of a run config (dict or DictConfig) that names the run's VAE, the latent tokenizers and the
    latent-cache data, points at `folder`."""
    data = config.get("data") or {}
    for spec in [*(config.get("tokenizer") or {}).values(), data.get("dataset")]:
        if spec is not None and "vae" in spec:
            spec["vae"] = str(folder)
