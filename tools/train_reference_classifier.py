#!/usr/bin/env python
"""Train the local reference classifier that selfflow-sample's metrics use (no downloads), on a labelled dataset
built from selfflow's own data configs, and save it as model.safetensors + config.json.

    python tools/train_reference_classifier.py --out refs/digits                      # built-in digits (16x16)
    python tools/train_reference_classifier.py --out refs/cifar data=image_folder data.root=DIR \\
        data.dataset.image_size=32
    python tools/train_reference_classifier.py --out refs/speech experiment=audio_digits   # audio: log-mel images
    selfflow-sample ckpt=runs/.../last.ckpt metrics=true reference=refs/digits

Trailing arguments are overrides of the training config (conf/train.yaml), so `data=...` means exactly what it
means for selfflow-train, and the classifier sees the images at the size the generator is trained on.
Prints one JSON line with the test accuracy.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfflow.cli.errors import friendly_errors  # noqa: E402


def compose_data_config(overrides: list[str]):
    """The `data` node of the training config with the given overrides (the built-in digit images unless an
    experiment=... says otherwise: the classifier learns one modality)."""
    from hydra import compose, initialize_config_module

    if not any(o.lstrip("+").startswith("experiment=") for o in overrides):
        overrides = ["experiment=digits", *overrides]
    with initialize_config_module("selfflow.conf", version_base="1.3"):
        data = compose("train", overrides=[*overrides, "run_dir=."]).data
    if "sources" in data:
        raise ValueError("the reference classifier learns one modality; use experiment=digits (images) or "
                         "experiment=audio_digits (audio), not a multi-modal mixture")
    return data


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write model.safetensors and config.json into")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage (features: 4 x width)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", help="training-config overrides, e.g. data=image_folder data.root=DIR")
    args = parser.parse_args(argv)
    with friendly_errors("train_reference_classifier"):
        from hydra.utils import instantiate

        from selfflow.evaluation.reference_classifier import train_reference_classifier

        data = compose_data_config(args.overrides)
        modality = data.get("modality", "image")
        if modality == "image":
            shape = {"channels": int(data.dataset.channels), "image_size": int(data.dataset.image_size), "audio": None}
        elif modality == "audio":  # the CNN reads a log-mel image of each recording
            rate = int(data.dataset.sample_rate)
            shape = {"channels": 1, "image_size": 32,
                     "audio": {"sample_rate": rate, "num_samples": round(rate * float(data.dataset.duration))}}
        else:
            raise ValueError(f"the reference classifier is for images or audio; data gives {modality!r} samples "
                             f"(for a multi-modal run pick one: experiment=digits or experiment=audio_digits)")
        dataset = instantiate(data.dataset)
        train_set, test_set = dataset(split="train"), dataset(split="test")
        num_classes = int(getattr(train_set, "num_classes", 0))
        started = time.perf_counter()
        model, test_accuracy = train_reference_classifier(
            train_set, test_set, num_classes, width=args.width, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, seed=args.seed, device=args.device,
            class_names=list(getattr(train_set, "class_names", [])) or None,
            log=lambda line: print(line, file=sys.stderr), **shape)
        record = {"out": str(Path(args.out).resolve()), "test_accuracy": test_accuracy, "num_train": len(train_set),
                  "num_test": len(test_set), "seconds": round(time.perf_counter() - started, 1),
                  "data": " ".join(args.overrides) or "digits"}
        model.save(args.out, test_accuracy=test_accuracy, data=record["data"], num_train=len(train_set))
        print(json.dumps(record))
        return record


if __name__ == "__main__":
    main()
