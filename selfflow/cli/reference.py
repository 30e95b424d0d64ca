"""selfflow-reference: train the local reference classifier that sample metrics use (no
downloads) on a labelled dataset of selfflow's own data configs; saved as model.safetensors and
config.json.

  selfflow-reference out=refs/digits                                   # built-in digits (16x16)
  selfflow-reference out=refs/cifar data=image_folder data.root=DIR data.dataset.image_size=32
  selfflow-reference out=refs/speech experiment=audio_digits           # audio: log-mel images
  selfflow-reference out=refs/moving experiment=video_digits video_frames=each epochs=4
  selfflow-sample ckpt=runs/.../last.ckpt metrics=true reference=refs/digits

Its keys are those of conf/reference.yaml; every other override is one of the training config
(conf/train.yaml), so `data=...` means exactly what it means for selfflow-train, and the classifier
sees the samples at the size the generator is trained on. Prints one JSON line with the test
accuracy.
"""

from __future__ import annotations

import json
import sys
import time
from importlib import resources
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from selfflow.cli.config_help import register_train_resolvers
from selfflow.cli.errors import check_overrides, friendly_errors

COMMAND = "selfflow-reference"


def own_keys() -> set[str]:
    """The keys conf/reference.yaml sets itself (out, epochs, ...); the others are the training
    config's."""
    conf = OmegaConf.load(resources.files("selfflow.conf") / "reference.yaml")
    return {str(key) for key in conf if key not in ("defaults", "hydra")}


def training_overrides(overrides: list[str]) -> list[str]:
    """The overrides of a command line that change the training config (the data), in order."""
    keys = own_keys()
    named = [(o, o.lstrip("+~").split("=", 1)[0]) for o in overrides]
    return [o for o, key in named if key not in keys and not key.startswith("hydra")]


def single_modality_data(cfg: DictConfig) -> DictConfig:
    """The `data` node of the composed config; a mixture of modalities is refused (one classifier,
    one modality)."""
    if "sources" in cfg.data:
        raise ValueError(
            "the reference classifier learns one modality; use experiment=digits (images) or "
            "experiment=audio_digits (audio), not a multi-modal mixture"
        )
    return cfg.data


def train_reference(cfg: DictConfig, overrides: list[str]) -> dict:
    """Build the data, train the classifier, save it to `cfg.out`; returns the record printed.

    Args:
        cfg: the composed conf/reference.yaml (the training config plus the classifier's keys).
        overrides: the command line's overrides of the training config (the record's `data`).

    Returns:
        out, test_accuracy, num_train, num_test, seconds and data.
    """
    from hydra.utils import instantiate

    from selfflow.evaluation.reference_classifier import reference_input, train_reference_classifier
    from selfflow.sampling.generate import resolve_device

    if OmegaConf.is_missing(cfg, "out"):
        raise ValueError(f"out=... is required: {COMMAND} out=DIR [experiment=... data=...]")
    data = instantiate(single_modality_data(cfg))
    train_set, test_set = data.train_set, data.test_set
    started = time.perf_counter()
    model, test_accuracy = train_reference_classifier(
        train_set,
        test_set,
        data.num_classes,
        width=int(cfg.width),
        epochs=int(cfg.epochs),
        batch_size=int(cfg.batch_size),
        lr=float(cfg.lr),
        seed=int(cfg.seed),
        device=str(resolve_device(str(cfg.device))),
        class_names=data.class_names or None,
        log=lambda line: print(line, file=sys.stderr),
        **reference_input(train_set, data.modality, str(cfg.video_frames)),
    )
    out = str(cfg.out)
    record = {
        "out": str(Path(out).resolve()),
        "test_accuracy": test_accuracy,
        "num_train": len(train_set),
        "num_test": len(test_set),
        "seconds": round(time.perf_counter() - started, 1),
        "data": " ".join(overrides) or "digits",
    }
    model.save(out, test_accuracy=test_accuracy, data=record["data"], num_train=len(train_set))
    print(json.dumps(record))
    return record


@hydra.main(config_path="pkg://selfflow.conf", config_name="reference", version_base="1.3")
def run_from_config(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    with friendly_errors(COMMAND):
        train_reference(cfg, training_overrides(list(HydraConfig.get().overrides.task)))


def main() -> None:
    """Bad overrides (unknown keys or options) stop here with one line; then Hydra composes and
    runs."""
    register_train_resolvers()  # --help's key list; reference.yaml builds on train.yaml
    check_overrides(COMMAND, "reference", sys.argv[1:])
    run_from_config()


if __name__ == "__main__":
    main()
