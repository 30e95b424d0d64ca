"""A sampling job on disk, chunk by chunk, so that it can be spread over processes and resumed after
a kill.

Samples 0..N-1 are cut into chunks of `chunk_size` consecutive indices. Each finished chunk is one
small file, `out_dir/parts/chunk_000123.npz` (indices, labels and the samples: images as uint8 [B,
C, H, W], other modalities as float32), written under a temporary name and renamed, so a file under
its final name is always complete. A job started again with the same settings samples only the
chunks not on disk yet, whatever its number of processes.

`out_dir/job.json` records the settings that decide the samples (weights, sampler, seed, ...),
written before the first chunk: a job with other settings into the same out_dir is refused instead
of mixing samples.

A chunk is bound to the job that wrote it: it carries the SHA-256 of the job's settings (`job`) and
of its own content (`digest`: the job digest, indices, labels and samples). A chunk of another job
is sampled again, and one whose content digest is broken (edited, or planted in `parts/` by hand) is
refused when the samples are merged. A chunk is written to a new temporary file and renamed into
`parts/` (`replace_atomically`), never through a planted link.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfflow.io.npz import ArrayHeader, npz_header, npz_keys
from selfflow.io.safe_files import (
    TEMPORARY_SUFFIX,
    replace_atomically,
    resolve_inside,
    write_json_atomically,
)

JOB_FILE = "job.json"
PARTS = "parts"
MEMBERS = ("indices", "labels", "samples")
BINDING = ("job", "digest")  # the job's settings digest and the chunk's content digest, hex strings
DIGEST_CHARS = 64
MAX_JOB_FILE_BYTES = 1 << 20


def chunk_ranges(num_samples: int, chunk_size: int) -> list[range]:
    """The indices of each chunk: [k * chunk_size, (k + 1) * chunk_size), the last one shorter."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    return [
        range(start, min(start + chunk_size, num_samples))
        for start in range(0, num_samples, chunk_size)
    ]


def settings_digest(settings: dict[str, Any]) -> str:
    """SHA-256 of the settings as canonical JSON (sorted keys): the identity of a job's samples."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def content_digest(job: str, indices: np.ndarray, labels: np.ndarray, samples: np.ndarray) -> str:
    """SHA-256 of a chunk's job digest and arrays (their dtypes, shapes and bytes)."""
    digest = hashlib.sha256(job.encode())
    for array in (indices, labels, samples):
        digest.update(f"{array.dtype.str}{list(array.shape)}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """'key: stored -> wanted' for every setting that differs (at most 3 listed, then a count)."""
    keys = [k for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
    shown = [
        f"{k}: {json.dumps(stored.get(k))[:60]} -> {json.dumps(wanted.get(k))[:60]}"
        for k in keys[:3]
    ]
    return shown + ([f"and {len(keys) - 3} more"] if len(keys) > 3 else [])


class ChunkStore:
    """The chunk files of one job in `out_dir/parts` and the job's settings in
    `out_dir/job.json`."""

    def __init__(self, out_dir: str | os.PathLike, num_samples: int, chunk_size: int):
        self.out_dir = Path(out_dir)
        self.parts = self.out_dir / PARTS
        self.ranges = chunk_ranges(num_samples, chunk_size)
        self.job_digest = settings_digest({})  # set by check_settings

    def path(self, chunk: int) -> Path:
        return self.parts / f"chunk_{chunk:06d}.npz"

    def read_settings(self) -> dict[str, Any] | None:
        path = self.out_dir / JOB_FILE
        if not path.is_file():
            return None
        try:
            if path.stat().st_size > MAX_JOB_FILE_BYTES:
                raise ValueError("too large")
            document = json.loads(path.read_text())
            settings = document["settings"]
            if not isinstance(settings, dict):
                raise ValueError("no settings")
        except (ValueError, KeyError, TypeError, OSError) as error:
            raise ValueError(
                f"{path} is not a sampling job file ({error}); choose another out_dir"
            ) from None
        return settings

    def check_settings(self, settings: dict[str, Any]) -> bool:
        """Whether job.json is to be written (none yet); other settings on disk are refused in
        one line."""
        settings = json.loads(json.dumps(settings))  # as read back: lists, not tuples
        self.job_digest = settings_digest(settings)
        stored = self.read_settings()
        if stored is None:
            if any(self.parts.glob("chunk_*.npz")):
                raise ValueError(
                    f"{self.parts} holds chunks but {self.out_dir / JOB_FILE} is missing, so their "
                    f"settings are unknown; delete {self.parts} or choose another out_dir"
                )
            return True
        if stored != settings:
            raise ValueError(
                f"out_dir={self.out_dir} holds samples of other settings "
                f"({'; '.join(differences(stored, settings))}); choose another out_dir, or delete "
                f"it to sample again"
            )
        return False

    def write_settings(self, settings: dict[str, Any], about: dict[str, Any]) -> None:
        """job.json: `settings` (compared on every start) and `about` (for people: paths,
        not compared)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomically(self.out_dir / JOB_FILE, {"settings": settings, **about}, indent=None)

    def is_complete(self, chunk: int) -> bool:
        """The chunk's file is there with all its members, the right number of rows and this job's
        digest (read from headers and the small `job` member only)."""
        path = self.path(chunk)
        if not path.is_file():
            return False
        try:
            if not set(MEMBERS + BINDING) <= npz_keys(path):
                return False
            count = (len(self.ranges[chunk]),)
            rows = all(npz_header(path, key).shape[:1] == count for key in MEMBERS)
            return rows and self._binding(path, "job") == self.job_digest
        except (ValueError, KeyError, OSError):
            return False

    @staticmethod
    def _binding(path: Path, key: str) -> str:
        """The `job` or `digest` member of a chunk: a hex string, its header checked before it is
        read."""
        header = npz_header(path, key)
        if header.shape != () or header.dtype != np.dtype(f"<U{DIGEST_CHARS}"):
            raise ValueError(f"{path}[{key}] is {header.dtype} {list(header.shape)}, not a digest")
        with np.load(path, allow_pickle=False) as members:
            return str(members[key])

    def missing(self) -> list[int]:
        return [k for k in range(len(self.ranges)) if not self.is_complete(k)]

    def write(self, chunk: int, labels: torch.Tensor, samples: np.ndarray) -> Path:
        """Chunk `chunk`'s labels [B] and samples [B, ...], synced to disk and renamed
        into place."""
        indices = np.asarray(self.ranges[chunk], dtype=np.int64)
        if len(samples) != len(indices) or len(labels) != len(indices):
            raise ValueError(
                f"chunk {chunk} holds samples {indices[0]}..{indices[-1]}: got {len(samples)} "
                f"samples and {len(labels)} labels"
            )
        self.parts.mkdir(parents=True, exist_ok=True)
        path = self.path(chunk)
        labels = labels.cpu().numpy().astype(np.int64)
        digest = content_digest(self.job_digest, indices, labels, samples)
        with replace_atomically(path, sync=True) as f:
            arrays = {"indices": indices, "labels": labels, "samples": samples}
            np.savez(f, **arrays, job=self.job_digest, digest=digest)
        return path

    def sample_header(self, chunk: int) -> ArrayHeader:
        return npz_header(self.path(chunk), "samples")

    def read(
        self, chunk: int, sample_shape: tuple[int, ...], dtype: np.dtype
    ) -> tuple[np.ndarray, np.ndarray]:
        """(labels [B], samples [B, *sample_shape]) of a chunk; every member's header is checked
        (the job's shapes and dtypes) before its data is read, and the indices must be the chunk's,
        in order."""
        path, rows = self.path(chunk), len(self.ranges[chunk])
        expected = {
            "indices": ((rows,), np.dtype(np.int64)),
            "labels": ((rows,), np.dtype(np.int64)),
            "samples": ((rows, *sample_shape), np.dtype(dtype)),
        }
        for key, (shape, wanted) in expected.items():
            header = npz_header(path, key)
            if header.shape != shape or header.dtype != wanted:
                raise ValueError(
                    f"{path}[{key}] is {header.dtype} {list(header.shape)}; this job's is {wanted} "
                    f"{list(shape)}: delete the file and run the job again to resample it"
                )
        resolve_inside(self.parts, path.name)  # a link to a file elsewhere is no chunk of this job
        with np.load(path, allow_pickle=False) as members:
            indices, labels, samples = (members[key] for key in MEMBERS)
        content = content_digest(self.job_digest, indices, labels, samples)
        bound = (self._binding(path, "job"), self._binding(path, "digest"))
        if bound != (self.job_digest, content):
            raise ValueError(
                f"{path} was not written by this sampling job (its job or content digest "
                f"differs: another job's chunk, edited or planted); delete it and run the job "
                f"again to resample it"
            )
        if indices.tolist() != list(self.ranges[chunk]):
            raise ValueError(
                f"{path} holds other sample indices than chunk {chunk}'s: delete it and run the "
                f"job again to resample it"
            )
        return labels, samples

    def remove_temporary(self) -> None:
        """Half-written chunks of killed processes (`.chunk_*.tmp`)."""
        for path in self.parts.glob(f".chunk_*.npz.*{TEMPORARY_SUFFIX}"):
            path.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.parts, ignore_errors=True)
