"""FID, sFID, Inception Score, precision and recall as the ADM evaluation suite defines them
(openai/guided-diffusion `evaluations/evaluator.py`, the numbers DiT, SiT, REPA and Self-Flow
report), with torch-fidelity's maths.

- FID: Frechet distance of the Gaussians (mean, covariance) of the pool_3 features [N, 2048].
- sFID: the same on the spatial features mixed_6/conv[..., :7] [N, 2023].
- Inception Score: softmax of the bias-free logits, exp(mean KL(p(y|x) || p(y))) in consecutive
  splits of 5,000 samples (the last split may be shorter), averaged over the splits; samples only.
- Precision / recall (Kynkaanniemi et al., k = 3): a point is on a set's manifold if it lies within
  the distance to the k-th nearest neighbour (itself excluded) of some point of that set; precision
  is the share of samples on the reference manifold, recall the share of reference images on the
  sample manifold; pool_3 features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

IS_SPLIT_SIZE = 5000
NEIGHBOURS = 3


@dataclass
class GaussianStats:
    """Mean [D] and covariance [D, D] of a feature set: ADM's (mu, sigma) or (mu_s, sigma_s)."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: Tensor) -> GaussianStats:
        """features: [N, D] float32, N >= 2."""
        from torch_fidelity.metric_fid import fid_features_to_statistics

        if features.shape[0] < 2:
            raise ValueError(f"statistics need at least 2 images, got {features.shape[0]}")
        stats = fid_features_to_statistics(features)
        return cls(stats["mu"], stats["sigma"])


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if a.mu.shape != b.mu.shape:
        raise ValueError(f"statistics of different features: {a.mu.shape} vs {b.mu.shape}")
    as_float64 = [
        {"mu": s.mu.astype(np.float64), "sigma": s.sigma.astype(np.float64)} for s in (a, b)
    ]
    return float(fid_statistics_to_metric(*as_float64, verbose=False)[KEY_METRIC_FID])


def inception_score(logits: Tensor, split_size: int = IS_SPLIT_SIZE) -> float:
    """logits: [N, 1008] -> the mean of the per-split scores, splits of `split_size`
    consecutive samples."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    scores = [
        isc_features_to_metric(split, splits=1, shuffle=False)[KEY_METRIC_ISC_MEAN]
        for split in logits.split(split_size)
    ]
    return float(np.mean(scores))


def precision_recall(
    samples: Tensor, ref: Tensor, neighbours: int = NEIGHBOURS, batch_size: int = 10000
) -> tuple[float, float]:
    """samples: [N, D], ref: [M, D] pool_3 features (on the device that computes the distances, in
    blocks of `batch_size` rows) -> (precision, recall)."""
    from torch_fidelity.metric_prc import (
        KEY_METRIC_PRECISION,
        KEY_METRIC_RECALL,
        prc_features_to_metric,
    )

    if min(len(samples), len(ref)) <= neighbours:
        raise ValueError(
            f"precision/recall with k={neighbours} need more than {neighbours} images on each "
            f"side, got {len(samples)} samples and {len(ref)} reference images"
        )
    out = prc_features_to_metric(
        samples,
        ref,
        prc_neighborhood=neighbours,
        prc_batch_size=batch_size,
        save_cpu_ram=True,
        verbose=False,
    )
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL])


@dataclass(kw_only=True)
class EvalSet:
    """One side of the comparison: its statistics, and the per-image features the other metrics need
    where the side has them (a statistics-only reference has none)."""

    name: str
    pool_stats: GaussianStats
    spatial_stats: GaussianStats | None
    pool: Tensor | None = None  # [N, 2048]: precision / recall
    logits: Tensor | None = None  # [N, 1008]: Inception Score
    count: int | None = None
    image_size: tuple[int, int] | None = None  # (h, w) of its images


def standard_metrics(
    samples: EvalSet,
    ref: EvalSet,
    device: str | torch.device = "cpu",
    distance_batch_size: int = 10000,
) -> dict[str, Any]:
    """The numbers of metrics.json; a metric whose inputs one side lacks is None, with a note
    saying why."""
    from selfflow.evaluation.inception import full_float32

    notes = []
    sfid = None
    if samples.spatial_stats is not None and ref.spatial_stats is not None:
        sfid = frechet_distance(samples.spatial_stats, ref.spatial_stats)
    else:
        lacking = samples if samples.spatial_stats is None else ref
        notes.append(f"sfid: {lacking.name} has no spatial statistics (mu_s, sigma_s)")
    inception = None
    if samples.logits is not None:
        inception = inception_score(samples.logits)
    else:
        notes.append(
            f"inception_score: {samples.name} holds statistics only; it needs the sample images"
        )
    precision = recall = None
    if samples.pool is not None and ref.pool is not None:
        with full_float32():
            precision, recall = precision_recall(
                samples.pool.to(device), ref.pool.to(device), batch_size=distance_batch_size
            )
    else:
        lacking = samples if samples.pool is None else ref
        notes.append(
            f"precision, recall: {lacking.name} holds statistics only; they need images (arr_0) or "
            f"pool features on both sides"
        )
    return {
        "fid": frechet_distance(samples.pool_stats, ref.pool_stats),
        "sfid": sfid,
        "inception_score": inception,
        "precision": precision,
        "recall": recall,
        "num_samples": samples.count,
        "num_ref": ref.count,
        "notes": notes,
    }
