#!/usr/bin/env python
r"""Encode a dataset once with the run's tokenizer (e.g. a latent autoencoder) and cache the tokens on disk.

    python tools/cache_tokens.py experiment=video_digits data=video_folder data.root=DIR \
        tokenizer=video_latent tokenizer.video.autoencoder_path=AE.pt
    selfflow-train experiment=video_digits data=video_folder data.root=DIR \
        tokenizer=video_latent tokenizer.video.autoencoder_path=AE.pt cache_tokens=true

Takes the same overrides as `selfflow-train`, for one modality (a single-modality experiment). The cache lives under $SELFFLOW_CACHE (default ~/.cache/selfflow)
in a folder keyed by the tokenizer config, the autoencoder file's content and the data preprocessing, so a run
with anything different never reads a stale cache. Both splits are encoded; the tokens are stored as float16.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfflow.cli.train import check_data_fits_experiment  # noqa: E402
from selfflow.data.token_cache import build_token_cache, fingerprint  # noqa: E402
from selfflow.training import build  # noqa: E402, F401 - registers the config resolvers


def encode_split(datamodule, tokenizer, split: str, batch_size: int, device: str):
    dataset = datamodule.train_set if split == "train" else datamodule.test_set
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                                         collate_fn=lambda items: [i for i in items if i is not None])

    def batches():
        with Progress() as progress:
            task = progress.add_task(f"encoding {split}", total=len(dataset))
            for items in loader:
                if items:
                    data = torch.stack([d for d, _ in items]).to(device)
                    with torch.no_grad():
                        tokens = tokenizer.encode(data).x
                    yield tokens, torch.tensor([label for _, label in items])
                progress.advance(task, len(items))

    return batches


def main(argv: list[str] | None = None) -> list[Path]:
    overrides = list(sys.argv[1:] if argv is None else argv)
    with initialize_config_module("selfflow.conf", version_base="1.3"):
        cfg = compose("train", overrides=["run_dir=.", *overrides])
    check_data_fits_experiment(cfg, overrides)
    if "sources" in cfg.data:
        raise SystemExit("cache_tokens: error: the tokens of one modality are cached at a time; add a "
                         "single-modality experiment, e.g. experiment=digits data=image_folder data.root=DIR")
    datamodule = instantiate(cfg.data)
    spec = cfg.tokenizer[datamodule.modality]
    tokenizer = instantiate(spec).to("cuda" if torch.cuda.is_available() else "cpu")
    device = next(iter(tokenizer.parameters()), torch.zeros(())).device.type
    folders = []
    for split in ("train", "test"):
        key = fingerprint(OmegaConf.to_container(spec, resolve=True),
                          OmegaConf.to_container(cfg.data[split], resolve=True))
        dataset = datamodule.train_set if split == "train" else datamodule.test_set
        probe = tokenizer.encode(dataset[0][0][None].to(device)).x
        folder = build_token_cache(key, encode_split(datamodule, tokenizer, split, 64, device), len(dataset),
                                   probe.shape[1], probe.shape[2], cfg.get("cache_dir"))
        print(f"{split}: {len(dataset)} samples -> {folder}")
        folders.append(folder)
    return folders


if __name__ == "__main__":
    main()
