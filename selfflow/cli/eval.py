"""selfflow-eval: FID, sFID, Inception Score, precision and recall of image samples against a
reference, as the ADM evaluation suite defines them, with the standard FID InceptionV3 loaded from
a local file.

  selfflow-eval samples=samples/run/samples.npz ref=VIRTUAL_imagenet256_labeled.npz \
    inception=pt_inception-2015-12-05-6726825d.pth out=metrics.json
  selfflow-eval samples=... ref=/data/train_images inception=...   # a folder: its statistics are
                                                                    # kept for ref=<them> next time

Writes `out` (metrics.json): fid, sfid, inception_score, precision, recall (null where a side holds
statistics only, with a note), num_samples, num_ref, the weights file and its sha256, and the
library that computed them. The work is in selfflow.evaluation.fid_job; this parses and calls.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from selfflow.cli.config_help import register_config_keys_resolver
from selfflow.cli.errors import check_overrides, friendly_errors
from selfflow.evaluation.fid_job import COMMAND, evaluate

__all__ = ["evaluate", "main"]  # the job itself is selfflow.evaluation.fid_job's


@hydra.main(config_path="pkg://selfflow.conf", config_name="eval", version_base="1.3")
def run_from_config(cfg: DictConfig) -> None:
    with friendly_errors(COMMAND):
        evaluate(cfg)


def main() -> None:
    """Bad overrides (unknown keys) stop here with one line; then Hydra composes and runs."""
    register_config_keys_resolver()  # --help's key list
    check_overrides(COMMAND, "eval", sys.argv[1:])
    run_from_config()


if __name__ == "__main__":
    main()
