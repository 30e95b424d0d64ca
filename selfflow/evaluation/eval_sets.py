"""The two sides of selfflow-eval read from disk: an .npz with images (`arr_0`) and/or statistics in
the ADM layout (`mu`, `sigma`, `mu_s`, `sigma_s`), or a folder of images; and the statistics file a
folder's are kept in for reuse.

As in ADM's evaluator, statistics stored in a file take precedence over those of its images; its
images still give the per-image features for precision, recall and the Inception Score. A statistics
file written here also holds the pool_3 features (`pool_features` [N, 2048], 8 KB per image), so
that reusing it keeps precision and recall.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from selfflow.evaluation.image_batches import (
    IMAGES_KEY,
    MAX_IMAGES,
    ImageSource,
    folder_images,
    npz_images,
)
from selfflow.evaluation.inception import (
    POOL_DIM,
    SPATIAL_DIM,
    InceptionExtractor,
    InceptionFeatures,
)
from selfflow.evaluation.standard_metrics import EvalSet, GaussianStats
from selfflow.io.npz import iter_rows, npz_header, npz_keys, read_small_array
from selfflow.io.safe_files import replace_atomically

POOL_STATS_KEYS, SPATIAL_STATS_KEYS = ("mu", "sigma"), ("mu_s", "sigma_s")
SHAPES = {
    "mu": (POOL_DIM,),
    "sigma": (POOL_DIM, POOL_DIM),
    "mu_s": (SPATIAL_DIM,),
    "sigma_s": (SPATIAL_DIM, SPATIAL_DIM),
}
POOL_FEATURES_KEY = "pool_features"


def extract_features(
    source: ImageSource, extractor: InceptionExtractor, batch_size: int, progress: bool = False
) -> InceptionFeatures:
    from rich.progress import Progress

    parts = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"Inception features of {source.name}", total=source.count)
        for images in source.batches(batch_size):
            parts.append(extractor(images))
            bar.advance(task, len(images))
    return InceptionFeatures.concat(parts)


def _stored_stats(path: Path, keys: set[str], names: tuple[str, str]) -> GaussianStats | None:
    """Stored (mean, covariance), refused unless finite with a symmetric covariance of non-negative
    variances: broken statistics would give a NaN FID (no JSON) or a negative sFID instead of an
    error."""
    if not set(names) <= keys:
        return None
    mean, cov = (read_small_array(path, name, SHAPES[name]) for name in names)
    problem = (
        "holds NaN or infinite values"
        if not (np.isfinite(mean).all() and np.isfinite(cov).all())
        else "is not a covariance (not symmetric, or a negative variance)"
        if not np.allclose(cov, cov.T, rtol=1e-5, atol=1e-8) or (np.diag(cov) < 0).any()
        else None
    )
    if problem is not None:
        raise ValueError(
            f"{path}[{names[0]}, {names[1]}] {problem}: no distance can be computed from these "
            f"statistics; compute them again (selfflow-eval ref=IMAGE_FOLDER writes them) or use "
            f"another reference"
        )
    return GaussianStats(mean, cov)


def _stored_pool_features(path: Path, keys: set[str]) -> torch.Tensor | None:
    if POOL_FEATURES_KEY not in keys:
        return None
    header = npz_header(path, POOL_FEATURES_KEY)
    if (
        len(header.shape) != 2
        or header.shape[1] != POOL_DIM
        or not 1 <= header.shape[0] <= MAX_IMAGES
    ):
        raise ValueError(
            f"{path}[{POOL_FEATURES_KEY}] is {list(header.shape)}; it must be [N <= {MAX_IMAGES}, "
            f"{POOL_DIM}] pool_3 features"
        )
    if header.dtype != np.float32:
        raise ValueError(f"{path}[{POOL_FEATURES_KEY}] is {header.dtype}; it must be float32")
    return torch.from_numpy(np.concatenate(list(iter_rows(path, POOL_FEATURES_KEY, 10000, header))))


def of_images(
    source: ImageSource,
    extractor: InceptionExtractor,
    batch_size: int,
    progress: bool = False,
    pool_stats: GaussianStats | None = None,
    spatial_stats: GaussianStats | None = None,
) -> EvalSet:
    """The features of every image, and their statistics unless stored ones are given."""
    features = extract_features(source, extractor, batch_size, progress)
    return EvalSet(
        name=source.name,
        pool_stats=pool_stats or GaussianStats.of(features.pool),
        spatial_stats=spatial_stats or GaussianStats.of(features.spatial),
        pool=features.pool,
        logits=features.logits,
        count=len(features),
        image_size=source.size,
    )


def load_eval_set(
    path: str | os.PathLike,
    extractor: InceptionExtractor,
    batch_size: int = 64,
    size: tuple[int, int] | None = None,
    progress: bool = False,
) -> EvalSet:
    """An .npz (images, statistics, or both) or a folder of images (at `size`, see
    `folder_images`)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return of_images(folder_images(path, size), extractor, batch_size, progress)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    keys = npz_keys(path)
    pool_stats = _stored_stats(path, keys, POOL_STATS_KEYS)
    spatial_stats = _stored_stats(path, keys, SPATIAL_STATS_KEYS)
    if IMAGES_KEY in keys:
        return of_images(
            npz_images(path), extractor, batch_size, progress, pool_stats, spatial_stats
        )
    if pool_stats is None:
        raise ValueError(
            f"{path} holds neither images ({IMAGES_KEY}: uint8 [N, H, W, 3]) nor statistics (mu, "
            f"sigma[, mu_s, sigma_s]); its arrays: {sorted(keys)}"
        )
    pool = _stored_pool_features(path, keys)
    return EvalSet(
        name=str(path),
        pool_stats=pool_stats,
        spatial_stats=spatial_stats,
        pool=pool,
        count=None if pool is None else len(pool),
    )


def reference_pool_stats(
    path: str | os.PathLike, extractor: InceptionExtractor, batch_size: int = 64
) -> GaussianStats:
    """A reference's pool_3 statistics for FID alone: stored `mu, sigma` of an .npz (which take
    precedence, as in load_eval_set), else those of its images or of a folder's images."""
    path = Path(path).expanduser()
    if path.is_file():
        stored = _stored_stats(path, npz_keys(path), POOL_STATS_KEYS)
        if stored is not None:
            return stored
    return load_eval_set(path, extractor, batch_size).pool_stats


def write_stats(eval_set: EvalSet, path: str | os.PathLike) -> Path:
    """mu, sigma, mu_s, sigma_s (the ADM layout) and pool_features, written atomically: reusable
    as ref=PATH."""
    path = Path(path).expanduser()
    if path.suffix != ".npz":
        raise ValueError(f"ref_stats_out={path} must end in .npz")
    arrays = {
        "mu": eval_set.pool_stats.mu,
        "sigma": eval_set.pool_stats.sigma,
        "mu_s": eval_set.spatial_stats.mu,
        "sigma_s": eval_set.spatial_stats.sigma,
    }
    if eval_set.pool is not None:
        arrays[POOL_FEATURES_KEY] = eval_set.pool.numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    with replace_atomically(path) as file:
        np.savez(file, **arrays)
    return path
