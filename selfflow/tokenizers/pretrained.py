"""Pretrained parts named by a path (a diffusers VAE folder: image, video or audio; a TorchScript
autoencoder file): the user names them, fingerprints decide.

Loading such a part runs or reads what it holds (TorchScript code can write files), so the file that
chooses it must be the user's: a config stored in a checkpoint or export keeps the path and the
fingerprint (sha256 of the part's files) it was trained with, but its path is never loaded. Whoever
rebuilds a model from a stored config names each part (`vae=PATH`, or `vae={image: PATH, video:
PATH}` for several), and a part whose fingerprint differs from the stored one is refused in one line
before anything of it is loaded.

Each kind of part is one row of PRETRAINED_PARTS: the tokenizer argument that names it and how it is
fingerprinted.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfflow.io.digests import file_digest
from selfflow.io.model_folders import vae_fingerprint


@functools.lru_cache(maxsize=16)
# stat: part of the cache key, so that an edited file is hashed again
def _file_fingerprint(path: Path, stat: tuple) -> str:
    digest = hashlib.sha256()
    file_digest(path, digest)
    return digest.hexdigest()


def file_fingerprint(path: str | os.PathLike, key: str) -> str:
    """sha256 of one file (a TorchScript autoencoder), refused in one line naming `key` when it is
    not a file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path} does not exist; point it at a torch.jit.save file")
    stat = path.stat()
    return _file_fingerprint(path.resolve(), (stat.st_size, stat.st_mtime_ns))


@dataclass(frozen=True)
class PretrainedPart:
    """One kind of pretrained part: the tokenizer argument naming it and its fingerprint
    function."""

    argument: str  # e.g. "vae" (a folder) or "autoencoder_path" (a file)
    fingerprint: Callable[[str | os.PathLike, str], str]  # (path, config key) -> sha256 hex
    what: str  # said in refusals


PRETRAINED_PARTS = (
    # any diffusers VAE folder: AutoencoderKL (image), and the video and audio classes of
    # selfflow.tokenizers.autoencoders (AutoencoderKLWan, AutoencoderOobleck, ...)
    PretrainedPart("vae", vae_fingerprint, "VAE"),
    PretrainedPart("autoencoder_path", file_fingerprint, "autoencoder"),
)


def part_named_by(spec: Mapping[str, Any]) -> PretrainedPart | None:
    """The kind of pretrained part a tokenizer config names (None for tokenizers without
    weights)."""
    return next((part for part in PRETRAINED_PARTS if part.argument in spec), None)


def check_part(path: str | os.PathLike, expected: str | None, argument: str, key: str) -> str:
    """The fingerprint of the part at `path`, computed without loading it; refused in one line when
    `expected` is given and differs.

    Args:
        path: where the user says the part is.
        expected: the fingerprint the model was trained with (None: nothing to compare).
        argument: the tokenizer argument naming the part (a PRETRAINED_PARTS row).
        key: the config key named in refusals, e.g. "tokenizer.video.autoencoder_path".

    Returns:

        The part's fingerprint (sha256 hex).
    """
    part = next(p for p in PRETRAINED_PARTS if p.argument == argument)
    found = part.fingerprint(path, key)
    if expected is not None and found != expected:
        raise ValueError(
            f"{key}={path} holds another {part.what} (fingerprint {found[:16]}) than the one "
            f"this model was trained with ({str(expected)[:16]}); point {key} at that {part.what}"
        )
    return found


Given = str | os.PathLike | Mapping[str, str] | None  # the user's vae=


def parts_given(given: Given, modalities: list[str], source: str) -> dict:
    """The user's `vae=` as {modality: path}: one path serves a model with one pretrained part;
    several parts need a mapping by modality."""
    if given is None:
        return {}
    if isinstance(given, Mapping):
        return {str(m): str(path) for m, path in given.items()}
    if len(modalities) > 1:
        raise ValueError(
            f"{source} has pretrained parts for {', '.join(modalities)}; pass one path each: "
            f"vae={{{', '.join(f'{m}: PATH' for m in modalities)}}}"
        )
    return {m: str(given) for m in modalities}


def point_parts(config, given: str | os.PathLike | Mapping[str, str] | None, source: str) -> None:
    """A stored run config (DictConfig) with each pretrained part re-pointed at the path the user
    gave and checked against the stored fingerprint; a part the user did not name is refused in one
    line (the stored path is never loaded). Nothing of a part is loaded here, and its tokenizer
    checks the fingerprint again before it loads.

    Args:
        config: the stored run config; its `tokenizer.<modality>` nodes (and a latent-cache data
            node) change.
        given: the user's `vae=`: a path, a {modality: path} mapping, or None.
        source: the checkpoint or export, named in refusals.
    """
    named = {m: part_named_by(spec) for m, spec in config.tokenizer.items()}
    named = {m: part for m, part in named.items() if part is not None}
    paths = parts_given(given, sorted(named), source)
    for modality, part in named.items():
        spec = config.tokenizer[modality]
        if modality not in paths:
            raise ValueError(
                f"{source} names its {modality} {part.what} by a path it stores "
                f"(tokenizer.{modality}.{part.argument}={spec[part.argument]}); a stored path is "
                f"never loaded: pass vae=PATH naming that {part.what} yourself (its fingerprint "
                "is checked)"
            )
        check_part(paths[modality], spec.get("fingerprint"), part.argument, "vae")
        spec[part.argument] = paths[modality]
    data = config.get("data") or {}
    dataset, modality = data.get("dataset"), data.get("modality", "image")
    # a latent cache follows the VAE of its modality
    if dataset is not None and "vae" in dataset and modality in paths:
        dataset["vae"] = paths[modality]


def check_stored_fingerprints(tokenizers: Mapping, stored_config: Mapping, source: str) -> None:
    """Resuming: each pretrained part the user's config names must be the one the checkpoint's run
    used (by fingerprint), whatever folder or file it is in now."""
    stored = (stored_config or {}).get("tokenizer") or {}
    for modality, tokenizer in tokenizers.items():
        spec = stored.get(modality) or {}
        ours, theirs, part = (
            getattr(tokenizer, "fingerprint", None),
            spec.get("fingerprint"),
            part_named_by(spec),
        )
        if ours and theirs and part is not None and ours != theirs:
            key = f"tokenizer.{modality}.{part.argument}"
            raise ValueError(
                f"{source} was trained with another {part.what} (fingerprint {theirs[:16]}) "
                f"than {key} ({ours[:16]}); point {key} at the {part.what} the run was trained with"
            )
