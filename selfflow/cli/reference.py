"""selfflow-reference: train the local reference classifier that sample metrics use (no downloads), on a labelled
dataset built from selfflow's own data configs, and save it as model.safetensors + config.json.

  selfflow-reference --out refs/digits                                  # built-in digits (16x16)
  selfflow-reference --out refs/cifar experiment=digits data=image_folder data.root=DIR data.dataset.image_size=32
  selfflow-reference --out refs/speech experiment=audio_digits          # audio: log-mel images
  selfflow-reference --out refs/moving experiment=video_digits --video-frames each --epochs 4 --batch-size 64
  selfflow-sample ckpt=runs/.../last.ckpt metrics=true reference=refs/digits

Trailing arguments are overrides of the training config (conf/train.yaml), so `data=...` means exactly what it
means for selfflow-train, and the classifier sees the samples at the size the generator is trained on.
Prints one JSON line with the test accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from selfflow.cli.errors import friendly_errors


def compose_data_config(overrides: list[str]):
    """The `data` node of the training config with the given overrides (the built-in digit images unless an
    experiment=... says otherwise: the classifier learns one modality)."""
    from hydra import compose, initialize_config_module

    if not any(o.lstrip("+").startswith("experiment=") for o in overrides):
        overrides = ["experiment=digits", *overrides]
    with initialize_config_module("selfflow.conf", version_base="1.3"):
        data = compose("train", overrides=[*overrides, "run_dir=."]).data
    if "sources" in data:
        raise ValueError(
            "the reference classifier learns one modality; use experiment=digits (images) or "
            "experiment=audio_digits (audio), not a multi-modal mixture"
        )
    return data


def parser() -> argparse.ArgumentParser:
    import torch

    top = argparse.ArgumentParser(
        prog="selfflow-reference", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    top.add_argument("--out", required=True, help="folder to write model.safetensors and config.json into")
    top.add_argument("--epochs", type=int, default=15)
    top.add_argument("--width", type=int, default=16, help="channels of the first stage (features: 4 x width)")
    top.add_argument("--batch-size", type=int, default=32)
    top.add_argument("--lr", type=float, default=2e-3)
    top.add_argument("--seed", type=int, default=0)
    top.add_argument(
        "--video-frames",
        choices=["stacked", "each"],
        default="stacked",
        help="video: frames stacked as channels (sees motion), or each read alone and averaged (sees what the "
        "frames show; then --batch-size counts frames)",
    )
    top.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    top.add_argument("overrides", nargs="*", help="training-config overrides, e.g. data=image_folder data.root=DIR")
    return top


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    with friendly_errors("selfflow-reference"):
        from hydra.utils import instantiate

        from selfflow.evaluation.reference_classifier import reference_input, train_reference_classifier

        data = instantiate(compose_data_config(args.overrides))
        train_set, test_set = data.train_set, data.test_set
        started = time.perf_counter()
        model, test_accuracy = train_reference_classifier(
            train_set,
            test_set,
            data.num_classes,
            width=args.width,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            class_names=data.class_names or None,
            log=lambda line: print(line, file=sys.stderr),
            **reference_input(train_set, data.modality, args.video_frames),
        )
        record = {
            "out": str(Path(args.out).resolve()),
            "test_accuracy": test_accuracy,
            "num_train": len(train_set),
            "num_test": len(test_set),
            "seconds": round(time.perf_counter() - started, 1),
            "data": " ".join(args.overrides) or "digits",
        }
        model.save(args.out, test_accuracy=test_accuracy, data=record["data"], num_train=len(train_set))
        print(json.dumps(record))
        return record


if __name__ == "__main__":
    main()
