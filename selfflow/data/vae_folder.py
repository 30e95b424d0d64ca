"""A frozen diffusers autoencoder from a local folder (never downloaded), and the fingerprint of its
files.

The image tokenizers load an `AutoencoderKL`; the video and audio tokenizers load one of the classes
their table names (`AutoencoderKLWan`, `AutoencoderOobleck`, ...), picked by the `_class_name` that
`save_pretrained` writes into config.json and accepted only from that table.

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
        raise ValueError(f"{key}={path}: config.json is larger than {MAX_CONFIG_BYTES} bytes; not a VAE config")
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
        raise ValueError(f"{key}=... needs diffusers: pip install 'selfflow[vae]' ({error})") from error
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
