"""selfflow-train: Self-Flow pretraining from the Hydra configs in conf/.

selfflow-train                                  # one model on built-in digit images, videos, audio
selfflow-train experiment=digits                # images only (video_digits, audio_digits: others)
selfflow-train data=image_folder data.root=DIR  # your images (class sub-folders)
selfflow-train objective.mask_ratio=0 objective.gamma=0  # vanilla flow-matching baseline
selfflow-train ckpt_path=runs/.../checkpoints/last.ckpt  # resume from a checkpoint
selfflow-train hydra.run.dir=runs/my_run resume=auto     # continue from the newest valid checkpoint
selfflow-train --help                           # every config group and key
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from selfflow.cli.config_help import register_train_resolvers
from selfflow.cli.errors import check_overrides, friendly_errors
from selfflow.training.resume import check_folder_of_this_run
from selfflow.training.run_folder import launching_process, lock_run_folder, remove_if_unused


@hydra.main(config_path="pkg://selfflow.conf", config_name="train", version_base="1.3")
def run_from_config(cfg: DictConfig) -> None:
    with friendly_errors("selfflow-train"):
        from selfflow.training.run import train  # imported here so that --help stays fast

        try:
            train(cfg)
        except Exception:
            remove_if_unused(
                cfg.run_dir
            )  # a run that stopped at start-up leaves no empty run folder
            raise


def given_run_dir(args: list[str]) -> str | None:
    """The run folder named on the command line (hydra.run.dir=...), for a single run."""
    if any(a in ("-m", "--multirun") for a in args):
        return None
    given = [a.split("=", 1)[1] for a in args if a.lstrip("+").startswith("hydra.run.dir=")]
    return given[-1] if given and "${" not in given[-1] else None


def starts_afresh(args: list[str]) -> bool:
    """No override continues a run (resume=auto, or ckpt_path=PATH)."""
    given = dict(a.lstrip("+").split("=", 1) for a in args if "=" in a)
    fresh = ("null", "none", "")
    return given.get("resume", "null") in fresh and given.get("ckpt_path", "null") in fresh


def main() -> None:
    """Bad overrides (unknown keys or options) stop here with one line, and so does a run folder
    that is in use, read-only, or holds another run's checkpoints while this run starts afresh
    (checked here, before Hydra writes its files into it); then Hydra composes and runs."""
    register_train_resolvers()  # --help's key list, sweep folders named by their overrides
    check_overrides("selfflow-train", "train", sys.argv[1:])
    run_dir = given_run_dir(sys.argv[1:])
    if run_dir is not None and launching_process():
        with friendly_errors("selfflow-train"):
            lock_run_folder(run_dir)  # held until this process ends
            if starts_afresh(sys.argv[1:]):
                check_folder_of_this_run(run_dir, None)
    run_from_config()


if __name__ == "__main__":
    main()
