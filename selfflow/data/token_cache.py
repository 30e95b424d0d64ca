"""Tokens cached on disk: encode a dataset once with a (latent) tokenizer, train from the stored tokens.

The cache folder is keyed by everything that decides the tokens: the tokenizer's config, the content of every
file it names (the autoencoder weights), the split's data config (preprocessing) and this format's version. A
changed autoencoder or preprocessing therefore looks for another folder and never reuses a stale cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from selfflow.data.cache import MARKER, cache_root, cached_folder

FORMAT = 1
NAME = "tokens"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(tokenizer_config: dict[str, Any], data_config: dict[str, Any]) -> dict[str, Any]:
    """What the cached tokens depend on; string values naming existing files are replaced by content hashes."""

    def files_in(value) -> list[str]:
        if isinstance(value, dict):
            return [f for v in value.values() for f in files_in(v)]
        if isinstance(value, (list, tuple)):
            return [f for v in value for f in files_in(v)]
        return [value] if isinstance(value, str) and os.path.isfile(os.path.expanduser(value)) else []

    files = {f: file_digest(Path(f).expanduser()) for f in sorted(set(files_in(tokenizer_config)))}
    return {"format": FORMAT, "tokenizer": tokenizer_config, "files": files, "data": data_config}


def cache_folder(key: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `cached_folder` keeps the tokens for this key (whether or not it exists yet)."""
    text = json.dumps(key, sort_keys=True)
    return cache_root(cache_dir) / NAME / hashlib.sha1(text.encode()).hexdigest()[:12]


def write_tokens(folder: Path, batches: Callable[[], Any], count: int, tokens: int, channels: int) -> None:
    """batches(): yields (tokens [b, N, C], labels [b]) for at most `count` samples (unreadable files are left out);
    stored as float16 tokens.npy and int64 labels.npy, whose length is the number of samples kept."""
    x = np.lib.format.open_memmap(folder / "tokens.npy", mode="w+", dtype=np.float16, shape=(count, tokens, channels))
    labels = np.zeros(count, dtype=np.int64)
    kept = 0
    for chunk, chunk_labels in batches():
        x[kept:kept + len(chunk)] = chunk.cpu().numpy().astype(np.float16)
        labels[kept:kept + len(chunk)] = chunk_labels.cpu().numpy()
        kept += len(chunk)
    x.flush()
    np.save(folder / "labels.npy", labels[:kept])


def build_token_cache(key: dict[str, Any], batches: Callable[[], Any], count: int, tokens: int, channels: int,
                      cache_dir: str | os.PathLike | None = None) -> Path:
    """Encode once into the keyed folder (a finished folder is reused as is)."""
    return cached_folder(NAME, key, lambda folder: write_tokens(folder, batches, count, tokens, channels), cache_dir)


class CachedTokens(Dataset):
    """Items `(tokens [N, C] float32, label)` from a cache built by `tools/cache_tokens.py`.

    tokenizer / data: the (plain dict) configs of the run that reads the cache; they must give the same key as the
    build, or the cache is refused.
    """

    yields_tokens = True

    def __init__(self, tokenizer: dict[str, Any], data: dict[str, Any], num_classes: int = 0,
                 class_names: list[str] | None = None, cache_dir: str | None = None):
        key = fingerprint(tokenizer, data)
        self.folder = cache_folder(key, cache_dir)
        if not (self.folder / MARKER).is_file():
            raise FileNotFoundError(
                f"no token cache for this tokenizer and data at {self.folder} (a changed autoencoder, tokenizer or "
                f"preprocessing needs a new cache); build it with: python tools/cache_tokens.py <the same overrides>"
            )
        self.tokens = np.load(self.folder / "tokens.npy", mmap_mode="r")
        self.labels = np.load(self.folder / "labels.npy")
        self.num_classes, self.class_names = num_classes, list(class_names or [])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return torch.from_numpy(np.asarray(self.tokens[i], dtype=np.float32)), int(self.labels[i])

