"""Frechet distance between two feature distributions, each summarised by its mean and
covariance (FID-style).

FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), computed in float64 through
symmetric eigen-decompositions (no scipy, no complex matrix square roots).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FeatureStats:
    """Mean [D] and covariance [D, D] of N feature vectors, in float64.

    Attributes:
        mean: [D] the mean feature.
        cov: [D, D] the (unbiased) covariance.
        count: N, the feature vectors summarised.
    """

    mean: Tensor
    cov: Tensor
    count: int

    @classmethod
    def of(cls, features: Tensor) -> FeatureStats:
        """features: [N, D] with N >= 2.

        Args:
            features: [N, D] feature vectors, N >= 2.

        Returns:
            Their float64 mean, covariance and count, on the CPU.

        Raises:
            ValueError: The features are not [N, D] with N >= 2.
        """
        if features.dim() != 2 or features.shape[0] < 2:
            raise ValueError(
                f"feature statistics need [N >= 2, D] features, got {list(features.shape)}; "
                f"generate more samples (num_samples)"
            )
        x = features.detach().double().cpu()
        return cls(x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1]), x.shape[0])


def _sqrt_psd(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative round-off
    eigenvalues clipped)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """Frechet distance between N(mean1, cov1) and N(mean2, cov2).

    Args:
        mean1: [D] the first distribution's mean.
        cov1: [D, D] its covariance.
        mean2: [D] the second distribution's mean.
        cov2: [D, D] its covariance.

    Returns:
        The distance, >= 0 (round-off below zero clipped).

    Raises:
        ValueError: The two have different feature sizes.
    """
    mean1, cov1, mean2, cov2 = (t.double().cpu() for t in (mean1, cov1, mean2, cov2))
    if mean1.shape != mean2.shape or cov1.shape != cov2.shape:
        raise ValueError(
            f"feature sizes differ: {tuple(mean1.shape)} vs {tuple(mean2.shape)}; compare features "
            f"from the same extractor"
        )
    root1 = _sqrt_psd(cov1)
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp_min(0).sqrt().sum()
    value = (mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * cross
    return max(float(value), 0.0)


def frechet_distance_of(a: FeatureStats, b: FeatureStats) -> float:
    """Frechet distance between two summarised feature sets (e.g. generated and reference).

    Args:
        a: One set's statistics.
        b: The other set's statistics, from the same feature extractor.

    Returns:
        The distance, >= 0.
    """
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)
