"""selfflow-sample: generate from a checkpoint with an ODE or SDE solver, guidance, and a fixed
seed.

  selfflow-sample ckpt=runs/.../last.ckpt num_samples=64 sampler=heun steps=50 cfg_scale=2
  selfflow-sample ckpt=... labels=[3,3,7] guidance_interval=[0.1,0.8] seed=1 out_dir=samples/run1
  selfflow-sample ckpt=... metrics=true reference=refs/digits  # metrics.json: FD, accuracy
  selfflow-sample ckpt=official:selfflow_imagenet256.pt vae=sd-vae-ft-ema num_samples=8  # released
  selfflow-sample ckpt=... size=[24,40]     # a multi-aspect model at any bucket's size
  selfflow-sample ckpt=... duration=2.0     # audio clips of another length (whole time patches)
  selfflow-sample ckpt=... frames=16        # video clips of another frame count (whole tubelets)

Writes into out_dir: per-sample files (images/*.png, videos/*.mp4 + contact_sheet.png,
audio/*.wav + *.png), grid.png and samples.npz (uint8 [N, H, W, 3] under arr_0) for images,
sampling.json (settings, NFE, timing), and metrics.json with metrics=true or fid. The work is in
selfflow.sampling.run_job; this parses, builds and calls.
"""

from __future__ import annotations

from dataclasses import fields
from functools import partial
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from selfflow.cli.config_help import register_config_keys_resolver
from selfflow.cli.errors import friendly_errors

LENGTH_OPTIONS = ("size", "duration", "frames")
METRICS = {False: None, None: None, True: "reference", "reference": "reference", "fid": "fid"}


def metrics_kind(value) -> str | None:
    """metrics=false, true (= reference: a local reference classifier's space) or fid
    (selfflow-eval)."""
    if (isinstance(value, (bool, str)) or value is None) and value in METRICS:
        return METRICS[value]
    raise ValueError(
        f"metrics={value!r} is unknown; choose false, true (= reference: Frechet distance and "
        f"accuracy of a reference classifier) or fid (FID, sFID, IS, precision, recall with "
        f"selfflow-eval)"
    )


def plain(cfg: DictConfig, key: str) -> Any:
    """The value of `key` as plain Python (lists, dicts), or None when unset."""
    value = cfg.get(key)
    return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value


def sample_request(cfg: DictConfig):
    """The config's keys as a `SampleRequest` (keys the config lacks keep their defaults)."""
    from selfflow.sampling.run_job import SampleRequest

    given = {f.name: plain(cfg, f.name) for f in fields(SampleRequest) if f.name in cfg}
    given["lengths"] = {key: plain(cfg, key) for key in LENGTH_OPTIONS}
    given["metrics"] = metrics_kind(cfg.metrics)
    return SampleRequest(**given)


def built(config: DictConfig | None):
    """A builder of the object a user's `_target_` config names, or None."""
    from hydra.utils import instantiate

    return None if config is None else partial(instantiate, config)


def reference_metrics(cfg: DictConfig):
    """metrics=true: a reference classifier's (or the user's extractor's) space."""
    from selfflow.evaluation.sample_metrics import ReferenceJobMetrics

    return ReferenceJobMetrics(
        reference=cfg.reference,
        build_extractor=built(cfg.feature_extractor),  # typed by the user
        build_real_set=built(cfg.metrics_data),
        source=f"checkpoint {cfg.ckpt}",
        max_real=cfg.metrics_max_real,
    )


def fid_metrics(cfg: DictConfig):
    """metrics=fid: selfflow-eval on samples.npz."""
    from selfflow.evaluation.fid_job import FidJobMetrics

    return FidJobMetrics(fid_ref=cfg.fid_ref, inception=cfg.inception, progress=cfg.progress)


METRIC_BUILDERS = {None: lambda cfg: None, "reference": reference_metrics, "fid": fid_metrics}


def build_metrics(cfg: DictConfig):
    """What the job measures (a `JobMetrics`), or None."""
    return METRIC_BUILDERS[metrics_kind(cfg.metrics)](cfg)


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Run selfflow-sample from its config, in each process of a launch; returns the summary
    written to sampling.json (by rank 0)."""
    from selfflow.sampling.run_job import run_sampling_job

    return run_sampling_job(sample_request(cfg), build_metrics(cfg))


@hydra.main(config_path="pkg://selfflow.conf", config_name="sample", version_base="1.3")
def run_from_config(cfg: DictConfig) -> None:
    with friendly_errors("selfflow-sample"):
        sample(cfg)


def main() -> None:
    """Registers the --help resolver, then Hydra composes and runs."""
    register_config_keys_resolver()
    run_from_config()


if __name__ == "__main__":
    main()
