"""Model folders as `save_pretrained` writes them (config.json + weight files), read without loading
a network: the folder checked, its config read within a size bound, the latent geometry a VAE's
config declares, and the fingerprint of its files. Loading the network is the tokenizers' job
(`selfflow.tokenizers.autoencoders`).

The fingerprint (sha256 over config.json and the weight files, by name and content) is what a
checkpoint and a latent cache record instead of the weights: a run, a resume, `selfflow-sample` or
`selfflow-probe` with a VAE of other content is refused by name, while the same VAE in another
folder is accepted.
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


def vae_folder(folder: str | os.PathLike, key: str = "vae", kind: str = "AutoencoderKL") -> Path:
    """The resolved folder, refused in one line (naming the config `key`) unless it holds a
    diffusers autoencoder (`kind`: the class named in the message)."""
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{key}={path} is not a diffusers {kind} folder (no config.json); save one "
            f"with {kind.split(' ')[0]}.save_pretrained(folder) and pass that folder (nothing is "
            f"downloaded)"
        )
    if (path / "config.json").stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(
            f"{key}={path}: config.json is larger than {MAX_CONFIG_BYTES} bytes; not a VAE config"
        )
    return path.resolve()


def read_vae_config(
    folder: str | os.PathLike,
    key: str = "vae",
    kind: str = "AutoencoderKL",
) -> dict:
    """The VAE's config.json as a dict (bounded in size), read without loading any weights.

    Args:
        folder: the VAE folder the user named.
        key: the config key named in refusals.
        kind: the classes the caller accepts, named in refusals.

    Returns:
        The parsed config (diffusers writes the class into `_class_name`).
    """
    path = vae_folder(folder, key, kind) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        message = f"{key}={folder}: {path} is not valid JSON ({error}); save the VAE again"
        raise ValueError(message) from error
    if not isinstance(config, dict):
        raise ValueError(f"{key}={folder}: {path} is not a JSON object; not a diffusers config")
    return config


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


@functools.lru_cache(maxsize=16)
def _fingerprint(
    folder: Path, stats: tuple
) -> str:  # stats: part of the cache key, so edited files rehash
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
    return _fingerprint(
        path, tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    )


def vae_fingerprint(folder: str | os.PathLike, key: str = "vae") -> str:
    """sha256 of config.json and the weight files (computed once per process and file state)."""
    return folder_fingerprint(vae_folder(folder, key))


def latent_geometry(folder: str | os.PathLike, key: str = "vae") -> tuple[int, int]:
    """(latent channels, pixels per latent position along a side) from the VAE's config.json: the
    factor is 2 per down block after the first (8 for SD-VAE and FLUX)."""
    path = vae_folder(folder, key) / "config.json"
    try:
        config = json.loads(path.read_text())
        return int(config.get("latent_channels", 4)), 2 ** (len(config["block_out_channels"]) - 1)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{key}={folder}: {path} has no list block_out_channels ({error}); "
            f"not an AutoencoderKL config"
        ) from error


def downsampling(folder: str | os.PathLike, key: str = "vae") -> int:
    """Pixels per latent position along a side (`latent_geometry`)."""
    return latent_geometry(folder, key)[1]
