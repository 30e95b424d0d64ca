"""selfflow-train: Self-Flow pretraining from the Hydra configs in conf/.

  selfflow-train                                   # built-in digits, a tiny model, a few CPU minutes
  selfflow-train data=image_folder data.root=DIR   # your images (class sub-folders)
  selfflow-train objective.mask_ratio=0 objective.gamma=0   # vanilla flow-matching baseline
  selfflow-train ckpt_path=runs/.../checkpoints/last.ckpt   # resume from a checkpoint
  selfflow-train hydra.run.dir=runs/my_run resume=auto     # continue a run from its newest valid checkpoint
  selfflow-train --help                            # every config group and key
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from selfflow.cli.errors import check_overrides, friendly_errors


@hydra.main(config_path="pkg://selfflow.conf", config_name="train", version_base="1.3")
def run_from_config(cfg: DictConfig) -> None:
    with friendly_errors("selfflow-train"):
        from selfflow.training.run import train  # imported here so that --help stays fast

        train(cfg)


def main() -> None:
    """Bad overrides (unknown keys or options) stop here with one line; then Hydra composes and runs."""
    check_overrides("selfflow-train", "train", sys.argv[1:])
    run_from_config()


if __name__ == "__main__":
    main()
