"""Content digests of files (sha256 in chunks): how checkpoints, exports and caches name the files
they depend on."""

from __future__ import annotations

import hashlib
import os


def file_digest(path: str | os.PathLike, digest=None, chunk: int = 1 << 22) -> str:
    """sha256 of a file's content, read in chunks (a file's identity whatever its name or
    location); `digest`: a hashlib object to feed instead (several files into one fingerprint),
    whose hex digest is returned."""
    digest = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
