"""Recognition shares: how many class-conditional samples a local reference classifier names as the
class they were conditioned on, with the classifiers for the built-in digit sets trained on the spot
once and cached by their data settings (nothing is downloaded).

A built-in set is judged on each label it knows (`JUDGED_LABELS`): the label the run is conditioned
on gives the `recognised` share (the classifier's top class is the conditioned one); any other
label (the moving digits' direction in a digit-conditioned run) gives a `clear` share (the
classifier's top class has probability >= `CLEAR_PROBABILITY`: the clip shows one direction
plainly, whichever it is).
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from selfflow.evaluation.reference_classifier import (
    CONFIG_FILE,
    ReferenceCNN,
    load_reference_classifier,
    reference_input,
    train_reference_classifier,
)
from selfflow.io.cache_folders import cached_folder
from selfflow.sampling.generate import generate
from selfflow.tokens import TEXT, Condition

# the built-in data sets whose reference classifiers train in seconds, the labels their samples are
# judged on, and each label's classifier settings beyond CLASSIFIER_SETTINGS: a moving digit is
# named from its frames read one by one (98-99% of real test clips; from the frames stacked as
# channels, 80-84%), its direction from the stacked frames
JUDGED_LABELS = {
    "selfflow.data.builtin.digits.DigitImages": {"digit": {}},
    "selfflow.data.builtin.moving_digits.MovingDigits": {
        "digit": {"video_frames": "each", "epochs": 4, "batch_size": 64},
        "direction": {"video_frames": "stacked", "epochs": 5},
    },
    "selfflow.data.builtin.spoken_digits.SpokenDigits": {
        "digit": {"epochs": 30}
    },  # 15: 62-94% of real test clips by seed
}
DATASET_CLASSES = {
    target: target.rsplit(".", 1) for target in JUDGED_LABELS
}  # the only classes ever built here
CLEAR_PROBABILITY = 0.5
# the largest built-in sets built here (each far above its default): a checkpoint's config cannot
# make the shares generate or allocate without bound
SIZE_LIMITS = {
    "clips_train": 20_000,
    "clips_test": 5_000,
    "num_frames": 64,
    "image_size": 128,
    "canvas_size": 256,
    "digit_size": 256,
    "voices": 32,
    "takes": 100,
    "sample_rate": 48_000,
    "duration": 10.0,
}
CLASSIFIER_SETTINGS = {
    "version": 2,
    "width": 16,
    "epochs": 15,
    "batch_size": 32,
    "lr": 2e-3,
    "seed": 0,
}
NOT_DATA_SETTINGS = (
    "_target_",
    "_partial_",
    "cache_dir",
    "on_bad_file",
    "split",
    "label",
    "preload",
)


def classifier_settings(dataset_target: str, label: str) -> dict[str, Any]:
    """The reference classifier's settings for one label of a built-in set: CLASSIFIER_SETTINGS and
    the label's own."""
    return {**CLASSIFIER_SETTINGS, **JUDGED_LABELS[dataset_target][label]}


def reference_key(dataset_config: dict[str, Any], label: str) -> dict[str, Any]:
    """What a cached reference classifier depends on: the data set's class and generation/reading
    settings, the label it learns and the classifier's own settings (not where the data is cached or
    how bad files are handled)."""
    settings = {k: v for k, v in dataset_config.items() if k not in NOT_DATA_SETTINGS}
    return {
        "dataset": dataset_config["_target_"],
        "settings": settings,
        "label": label,
        "classifier": classifier_settings(dataset_config["_target_"], label),
    }


def in_memory(dataset: Dataset, batch_size: int = 256) -> TensorDataset:
    """Every (sample, label) of `dataset` decoded once into tensors: 15 epochs then cost
    no decoding."""
    samples, labels = zip(
        *((x, torch.as_tensor(y)) for x, y in DataLoader(dataset, batch_size=batch_size))
    )
    return TensorDataset(torch.cat(samples), torch.cat(labels))


def train_reference(
    train_set: Dataset,
    test_set: Dataset,
    modality: str,
    settings: dict[str, Any] = CLASSIFIER_SETTINGS,
) -> tuple[ReferenceCNN, float | None]:
    """A `ReferenceCNN` for `modality` on the labelled sets (their `num_classes` and `class_names`)
    with `settings` (`classifier_settings`), and its test accuracy."""
    options = {k: v for k, v in settings.items() if k not in ("version", "video_frames")}
    return train_reference_classifier(
        in_memory(train_set),
        in_memory(test_set),
        train_set.num_classes,
        class_names=list(train_set.class_names),
        log=lambda line: None,
        **options,
        **reference_input(train_set, modality, settings.get("video_frames", "stacked")),
    )


def cached_reference(
    key: dict[str, Any],
    train: Callable[[], tuple[ReferenceCNN, float | None]],
    cache_dir: str | None,
    device: torch.device | str = "cpu",
) -> tuple[ReferenceCNN, float | None]:
    """(classifier, its test accuracy) stored under `<cache>/reference_classifiers/<hash of key>`,
    trained by `train()` the first time only."""

    def build(folder) -> None:
        model, test_accuracy = train()
        model.save(folder, test_accuracy=test_accuracy)

    folder = cached_folder("reference_classifiers", key, build, cache_dir)
    stored = json.loads((folder / CONFIG_FILE).read_text())
    return load_reference_classifier(folder, device), stored.get("test_accuracy")


@torch.no_grad()
def probabilities(classifier: Any, samples: Tensor, batch_size: int = 256) -> Tensor:
    """samples: [B, ...] as the classifier reads them -> class probabilities [B, K]."""
    return torch.cat(
        [classifier.logits(part).float().softmax(-1).cpu() for part in samples.split(batch_size)]
    )


def recognised_share(probs: Tensor, labels: Tensor) -> float:
    """probs: [B, K], labels: [B] -> the share of samples whose top class is their label."""
    return float((probs.argmax(-1) == labels.cpu()).float().mean())


def clear_share(probs: Tensor, threshold: float = CLEAR_PROBABILITY) -> float:
    """probs: [B, K] -> the share of samples whose top class has probability >= threshold."""
    return float((probs.max(-1).values >= threshold).float().mean())


def judge(
    classifiers: dict[str, Any], conditioned_on: str, samples: Tensor, labels: Tensor
) -> dict[str, Any]:
    """One modality's shares: `recognised` by the classifier of the conditioned label,
    `<label>_clear` by each other label's classifier. classifiers: {label: classifier}; samples:
    [B, ...]; labels: [B]."""
    entry: dict[str, Any] = {"num_samples": len(labels)}
    for label, classifier in classifiers.items():
        probs = probabilities(classifier, samples)
        if label == conditioned_on:
            entry["recognised"] = recognised_share(probs, labels)
        else:
            entry[f"{label}_clear"] = clear_share(probs)
    return entry


def dataset_configs(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{modality: dataset config} of a run's resolved data config: each source of a mixture, or the
    one dataset."""
    if "sources" in data:
        return {
            modality: source["dataset"]
            for modality, source in data["sources"].items()
            if "dataset" in source
        }
    return {data["modality"]: data["dataset"]} if "dataset" in data and "modality" in data else {}


def judged_sets(data: dict[str, Any], modalities) -> dict[str, dict[str, Any]]:
    """{modality: dataset config} of the built-in digit sets among a run's data, for the
    generated `modalities`."""
    return {
        m: c
        for m, c in dataset_configs(data).items()
        if m in modalities and isinstance(c, dict) and c.get("_target_") in JUDGED_LABELS
    }


def check_size_limits(options: dict[str, Any]) -> None:
    """A ValueError for a built-in set larger than SIZE_LIMITS (numbers, or the length of
    a list)."""
    for key, limit in SIZE_LIMITS.items():
        value = options.get(key)
        size = len(value) if isinstance(value, (list, tuple)) else value
        if isinstance(size, (int, float)) and size > limit:
            raise ValueError(
                f"the data config asks for a built-in set with {key}={size}; recognition shares "
                f"build at most {limit} (SIZE_LIMITS in selfflow/evaluation/recognition.py)"
            )


def built_in_dataset(
    dataset_config: dict[str, Any], split: str, label: str, cache_dir: str | None
) -> Dataset:
    """One split of a built-in digit set (a `JUDGED_LABELS` class, nothing else, no larger
    than SIZE_LIMITS: the config may come from someone else's checkpoint), labelled by `label`, made
    in `cache_dir` (the caller's, never a path from the config)."""
    module_name, class_name = DATASET_CLASSES[dataset_config["_target_"]]
    options = {k: v for k, v in dataset_config.items() if k not in NOT_DATA_SETTINGS}
    check_size_limits(options)
    if "label" in dataset_config:
        options["label"] = label
    if "cache_dir" in dataset_config:
        options["cache_dir"] = cache_dir
    return getattr(importlib.import_module(module_name), class_name)(split=split, **options)


def reference_classifiers(
    modality: str,
    dataset_config: dict[str, Any],
    cache_dir: str | None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, ReferenceCNN], dict[str, Any]]:
    """({label: reference classifier}, {label: its test accuracy}) for one built-in set, trained the
    first time."""
    classifiers, accuracies = {}, {}
    for label in JUDGED_LABELS[dataset_config["_target_"]]:

        def train(label=label):
            log(
                f"recognition: training the {modality} reference classifier "
                f"for {label} (once; cached)"
            )
            return train_reference(
                built_in_dataset(dataset_config, "train", label, cache_dir),
                built_in_dataset(dataset_config, "test", label, cache_dir),
                modality,
                classifier_settings(dataset_config["_target_"], label),
            )

        with torch.random.fork_rng(devices=[]):
            classifiers[label], accuracies[label] = cached_reference(
                reference_key(dataset_config, label), train, cache_dir
            )
    return classifiers, accuracies


@torch.no_grad()
def class_samples(
    model, tokenizer, labels: Tensor, steps: int, cfg_scale: float, seed: int, batch_size: int = 100
) -> Tensor:
    """Decoded samples [B, ...] of `labels` [B] (Euler ODE), `batch_size` at a time, noise fixed
    by `seed`."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    parts = [
        generate(
            model,
            tokenizer,
            Condition(labels=part),
            steps=steps,
            cfg_scale=cfg_scale,
            generator=generator,
        )
        for part in labels.split(batch_size)
    ]
    return torch.cat([part.float().cpu() for part in parts])


def measure_recognition(
    model,
    tokenizers: dict[str, Any],
    data: dict[str, Any],
    samples_per_class: int = 10,
    steps: int = 50,
    cfg_scale: float = 1.0,
    seed: int = 1,
    cache_dir: str | None = None,
    batch_size: int = 100,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """recognition.json: per judged modality of a class-conditional model, its shares (`judge`)
    over `samples_per_class` samples of every class, the reference classifiers' test accuracies and
    the sampler."""
    report = {}
    if model.num_classes == 0 or TEXT in tokenizers:
        return report
    for modality, dataset_config in judged_sets(data, tokenizers).items():
        classifiers, accuracies = reference_classifiers(modality, dataset_config, cache_dir, log)
        labels = torch.arange(model.num_classes).repeat_interleave(samples_per_class)
        samples = class_samples(
            model, tokenizers[modality], labels, steps, cfg_scale, seed, batch_size
        )
        report[modality] = {
            **judge(classifiers, dataset_config.get("label", "digit"), samples, labels),
            "reference_test_accuracy": accuracies,
            "steps": steps,
            "cfg_scale": cfg_scale,
        }
    return report


def percent(share: float) -> str:
    return f"{math.floor(100 * share + 0.5)}%"


def format_recognition(report: dict[str, dict[str, Any]]) -> str:
    """One line per judged modality, e.g. `  video: 72% of 100 samples recognised as their class
    (direction clear in 81%)`."""
    lines = []
    for modality, entry in report.items():
        clear = [
            f"{key[: -len('_clear')]} clear in {percent(value)}"
            for key, value in entry.items()
            if key.endswith("_clear")
        ]
        extra = f" ({', '.join(clear)})" if clear else ""
        lines.append(
            f"  {modality}: {percent(entry['recognised'])} of {entry['num_samples']} samples "
            f"recognised as their class{extra}"
        )
    return "\n".join(lines)
