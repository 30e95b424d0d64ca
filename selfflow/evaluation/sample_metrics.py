"""Metrics of generated images in a local extractor's feature space: Frechet distance to real data,
and the accuracy with which the extractor (a classifier) recognises the class each sample was
conditioned on.

An extractor is any object with `features(images: [B, C, H, W] in [0, 1]) -> [B, D]`; if it also has
`logits(images) -> [B, K]`, class-conditional samples get an accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from selfflow.evaluation.frechet import FeatureStats, frechet_distance_of


class FeatureAccumulator:
    """Collects features (and classifier hits for labelled images) batch by batch."""

    def __init__(self, extractor: Any):
        self.extractor = extractor
        self.features: list[Tensor] = []
        self.correct = self.labelled = 0

    @torch.no_grad()
    def add(self, images: Tensor, labels: Tensor | None = None) -> None:
        """images: [B, C, H, W] in [0, 1]; labels: [B], where labels outside the classifier's
        classes are ignored."""
        self.features.append(self.extractor.features(images).float().cpu())
        logits = getattr(self.extractor, "logits", None)
        if labels is None or logits is None:
            return
        labels = torch.as_tensor(labels).cpu()
        known = (labels >= 0) & (labels < int(getattr(self.extractor, "num_classes", 0) or 0))
        if known.any():
            predicted = logits(images[known.to(images.device)]).argmax(-1).cpu()
            self.correct += int((predicted == labels[known]).sum())
            self.labelled += int(known.sum())

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def stats(self) -> FeatureStats:
        return FeatureStats.of(torch.cat(self.features))


def dataset_features(
    extractor: Any, dataset: Dataset, batch_size: int = 256, limit: int | None = None
) -> FeatureAccumulator:
    """Features and classifier accuracy of a labelled dataset of `(image, label)` (e.g. a run's
    test split)."""
    accumulator = FeatureAccumulator(extractor)
    seen = 0
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        accumulator.add(images, torch.as_tensor(labels))
        seen += len(images)
        if limit is not None and seen >= limit:
            break
    return accumulator


def sample_metrics(samples: FeatureAccumulator, real: FeatureAccumulator) -> dict[str, Any]:
    """The numbers for metrics.json: FD of samples to real data, both accuracies, and the counts
    behind them."""
    return {
        "frechet_distance": frechet_distance_of(samples.stats(), real.stats()),
        "classifier_accuracy": samples.accuracy,
        "real_classifier_accuracy": real.accuracy,
        "num_samples": sum(len(f) for f in samples.features),
        "num_real": sum(len(f) for f in real.features),
        "num_labelled_samples": samples.labelled,
    }


def reference_metrics(
    modality: str,
    device,
    reference: str | None = None,
    extractor: Any = None,
    real_set: Dataset | None = None,
    stored_data: Any = None,
    source: str = "the checkpoint",
    max_real: int | None = None,
) -> tuple[Any, FeatureAccumulator]:
    """(extractor, features of the real data) for `selfflow-sample metrics=true`: the extractor is
    the reference classifier in `reference` (a `selfflow-reference` folder) unless one is given; the
    real data is `real_set`, else the test split of the checkpoint's stored data config
    (`stored_data`, built through the allow-list)."""
    from selfflow.evaluation.reference_classifier import load_reference_classifier
    from selfflow.safe_config import instantiate_stored

    if extractor is None:
        if reference is None:
            raise ValueError(
                "metrics=true needs reference=PATH (a folder written by selfflow-reference) or "
                "feature_extractor={_target_: ...}"
            )
        extractor = load_reference_classifier(reference, device)
        if extractor.modality != modality:
            raise ValueError(
                f"reference={reference} judges {extractor.modality}, but this run samples "
                f"{modality}; train one on the run's data: selfflow-reference "
                f"out=DIR <its data overrides>"
            )
    if real_set is None:
        if stored_data is None or "dataset" not in stored_data:
            raise ValueError(
                "metrics=true cannot find real samples: this checkpoint stores no data config; "
                "pass metrics_data={_target_: ...} (a dataset of (sample, label))"
            )
        real_set = instantiate_stored(stored_data.dataset, source, "data.dataset")(split="test")
    return extractor, dataset_features(extractor, real_set, limit=max_real)


class ReferenceJobMetrics:
    """`selfflow-sample metrics=true`: the samples' Frechet distance to real data and their class
    accuracy in a reference classifier's (or a given extractor's) feature space, as metrics.json.

    Args:
        reference: A `selfflow-reference` folder; used when no extractor is given.
        build_extractor: Builds the user's extractor (a `feature_extractor` config); None for the
            reference classifier.
        build_real_set: Builds the user's real data (a `metrics_data` config); None for the
            checkpoint's test split.
        source: The checkpoint's name in error messages.
        max_real: The most real samples measured.
    """

    def __init__(
        self,
        *,
        reference: str | None,
        build_extractor: Callable[[], Any] | None,
        build_real_set: Callable[[], Dataset] | None,
        source: str,
        max_real: int | None,
    ):
        self.reference, self.source, self.max_real = reference, source, max_real
        self.build_extractor, self.build_real_set = build_extractor, build_real_set
        self.device: torch.device | None = None
        self.samples: FeatureAccumulator | None = None
        self.real: FeatureAccumulator | None = None

    def before_loading(self, out_dir: Path, device: torch.device) -> None:
        """Nothing to check before the checkpoint loads."""

    def check_modality(self, modality: str) -> None:
        """Only modalities a reference classifier can judge.

        Args:
            modality: The generated modality.
        """
        from selfflow.sampling.modalities import MODALITIES, modality_io

        if not modality_io(modality).judged:
            judged = " and ".join(m for m, io in MODALITIES.items() if io.judged)
            raise ValueError(f"metrics=true is for {judged}; this run samples {modality}")

    def prepare(self, loaded, modality: str, device: torch.device) -> None:
        """Build the extractor and measure the real data, before sampling.

        Args:
            loaded (SamplingModel): The checkpoint (its stored data config).
            modality: The generated modality.
            device: Where the extractor runs.
        """
        extractor = self.build_extractor() if self.build_extractor is not None else None
        real_set = self.build_real_set() if self.build_real_set is not None else None
        extractor, self.real = reference_metrics(
            modality,
            device,
            self.reference,
            extractor,
            real_set,
            loaded.data_config,
            self.source,
            self.max_real,
        )
        self.device, self.samples = device, FeatureAccumulator(extractor)

    def visit(self, samples: Tensor, labels: Tensor) -> None:
        """Features of one chunk of decoded samples."""
        self.samples.add(samples.to(self.device), labels)

    def finish(self, out_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
        """Write metrics.json and print its two numbers.

        Args:
            out_dir: The job's folder.
            summary: The job's summary (sampler, NFE, guidance scale).

        Returns:
            The metrics written.
        """
        from selfflow.io.safe_files import write_json_atomically

        metrics = {
            **sample_metrics(self.samples, self.real),
            "sampler": summary["sampler"],
            "nfe": summary["nfe"],
            "cfg_scale": summary["cfg_scale"],
            "reference": "feature_extractor" if self.build_extractor else str(self.reference),
        }
        write_json_atomically(out_dir / "metrics.json", metrics)
        accuracy = metrics["classifier_accuracy"]
        shown = "n/a" if accuracy is None else f"{accuracy:.3f}"
        print(
            f"selfflow-sample: Frechet distance {metrics['frechet_distance']:.3f}, classifier "
            f"accuracy {shown} -> {out_dir / 'metrics.json'}"
        )
        return metrics
