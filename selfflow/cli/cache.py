"""selfflow-cache: encode an image dataset once into VAE latents (posterior mean and std of each
image and of its mirror image) for `selfflow-train ... data=latent_cache data.root=OUT`. Takes the
overrides of the training run. Clips and waves of a video or audio VAE tokenizer
(tokenizer=video_vae / audio_vae) are cached the same way, for data=video_latent_cache /
audio_latent_cache.

  selfflow-cache experiment=imagenet256 data.root=/data/imagenet \
      tokenizer.image.vae=/models/sd-vae-ft-ema out_dir=/data/imagenet256-sdvae devices=8
  # the same, launched by torchrun:
  torchrun --nproc-per-node=8 -m selfflow.cli.cache experiment=imagenet256 ... devices=8
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from selfflow.cli.config_help import register_train_resolvers
from selfflow.cli.errors import check_overrides, friendly_errors


@hydra.main(config_path="pkg://selfflow.conf", config_name="cache", version_base="1.3")
def run_from_config(cfg: DictConfig) -> None:
    with friendly_errors("selfflow-cache"):
        from selfflow.training.encode_latents import build_latent_cache

        build_latent_cache(cfg)


def main() -> None:
    """Bad overrides stop here with one line; then Hydra composes and runs."""
    # cache.yaml builds on train.yaml (its --help template, its sweep folders)
    register_train_resolvers()
    check_overrides("selfflow-cache", "cache", sys.argv[1:])
    run_from_config()


if __name__ == "__main__":
    main()
