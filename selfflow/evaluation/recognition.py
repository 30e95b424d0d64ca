"""Recognition shares: how many class-conditional samples a local reference classifier names as the class they were
conditioned on, with the classifiers for the built-in digit sets trained on the spot once and cached by their data
settings (nothing is downloaded).

A built-in set is judged on each label it knows (`JUDGED_LABELS`): the label the run is conditioned on gives the
`recognised` share (the classifier's top class is the conditioned one); any other label (the moving digits'
direction in a digit-conditioned run) gives a `clear` share (the classifier's top class has probability >=
`CLEAR_PROBABILITY`: the clip shows one direction plainly, whichever it is).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from selfflow.data.cache import cached_folder
from selfflow.evaluation.reference_classifier import (
    CONFIG_FILE,
    ReferenceCNN,
    load_reference_classifier,
    reference_input,
    train_reference_classifier,
)

# the built-in data sets whose reference classifiers train in seconds, and the labels their samples are judged on
JUDGED_LABELS = {
    "selfflow.data.digits.DigitImages": ("digit",),
    "selfflow.data.moving_digits.MovingDigits": ("digit", "direction"),
    "selfflow.data.spoken_digits.SpokenDigits": ("digit",),
}
CLEAR_PROBABILITY = 0.5
CLASSIFIER_SETTINGS = {"version": 1, "width": 16, "epochs": 15, "batch_size": 32, "lr": 2e-3, "seed": 0}
NOT_DATA_SETTINGS = ("_target_", "_partial_", "cache_dir", "on_bad_file", "split", "label")


def reference_key(dataset_config: dict[str, Any], label: str) -> dict[str, Any]:
    """What a cached reference classifier depends on: the data set's class and generation/reading settings, the
    label it learns and the classifier's own settings (not where the data is cached or how bad files are handled)."""
    settings = {k: v for k, v in dataset_config.items() if k not in NOT_DATA_SETTINGS}
    return {"dataset": dataset_config["_target_"], "settings": settings, "label": label,
            "classifier": CLASSIFIER_SETTINGS}


def in_memory(dataset: Dataset, batch_size: int = 256) -> TensorDataset:
    """Every (sample, label) of `dataset` decoded once into tensors: 15 epochs then cost no decoding."""
    samples, labels = zip(*((x, torch.as_tensor(y)) for x, y in DataLoader(dataset, batch_size=batch_size)))
    return TensorDataset(torch.cat(samples), torch.cat(labels))


def train_reference(train_set: Dataset, test_set: Dataset, modality: str) -> tuple[ReferenceCNN, float | None]:
    """A `ReferenceCNN` for `modality` on the labelled sets (their `num_classes` and `class_names`), and its test
    accuracy."""
    settings = {k: v for k, v in CLASSIFIER_SETTINGS.items() if k != "version"}
    return train_reference_classifier(
        in_memory(train_set), in_memory(test_set), train_set.num_classes, class_names=list(train_set.class_names),
        log=lambda line: None, **settings, **reference_input(train_set, modality))


def cached_reference(key: dict[str, Any], train: Callable[[], tuple[ReferenceCNN, float | None]],
                     cache_dir: str | None, device: torch.device | str = "cpu") -> tuple[ReferenceCNN, float | None]:
    """(classifier, its test accuracy) stored under `<cache>/reference_classifiers/<hash of key>`, trained by
    `train()` the first time only."""
    def build(folder) -> None:
        model, test_accuracy = train()
        model.save(folder, test_accuracy=test_accuracy)

    folder = cached_folder("reference_classifiers", key, build, cache_dir)
    stored = json.loads((folder / CONFIG_FILE).read_text())
    return load_reference_classifier(folder, device), stored.get("test_accuracy")


@torch.no_grad()
def probabilities(classifier: Any, samples: Tensor, batch_size: int = 256) -> Tensor:
    """samples: [B, ...] as the classifier reads them -> class probabilities [B, K]."""
    return torch.cat([classifier.logits(part).float().softmax(-1).cpu() for part in samples.split(batch_size)])


def recognised_share(probs: Tensor, labels: Tensor) -> float:
    """probs: [B, K], labels: [B] -> the share of samples whose top class is their label."""
    return float((probs.argmax(-1) == labels.cpu()).float().mean())


def clear_share(probs: Tensor, threshold: float = CLEAR_PROBABILITY) -> float:
    """probs: [B, K] -> the share of samples whose top class has probability >= threshold."""
    return float((probs.max(-1).values >= threshold).float().mean())


def judge(classifiers: dict[str, Any], conditioned_on: str, samples: Tensor, labels: Tensor) -> dict[str, Any]:
    """One modality's shares: `recognised` by the classifier of the conditioned label, `<label>_clear` by each
    other label's classifier. classifiers: {label: classifier}; samples: [B, ...]; labels: [B]."""
    entry: dict[str, Any] = {"num_samples": len(labels)}
    for label, classifier in classifiers.items():
        probs = probabilities(classifier, samples)
        if label == conditioned_on:
            entry["recognised"] = recognised_share(probs, labels)
        else:
            entry[f"{label}_clear"] = clear_share(probs)
    return entry


def percent(share: float) -> str:
    return f"{math.floor(100 * share + 0.5)}%"


def format_recognition(report: dict[str, dict[str, Any]]) -> str:
    """One line per judged modality, e.g. `  video: 72% of 100 samples recognised as their class (direction clear
    in 81%)`."""
    lines = []
    for modality, entry in report.items():
        clear = [f"{key[:-len('_clear')]} clear in {percent(value)}" for key, value in entry.items()
                 if key.endswith("_clear")]
        extra = f" ({', '.join(clear)})" if clear else ""
        lines.append(f"  {modality}: {percent(entry['recognised'])} of {entry['num_samples']} samples recognised "
                     f"as their class{extra}")
    return "\n".join(lines)
