"""Encode an image dataset once into a latent cache (`selfflow-cache`): the VAE posterior of every image and of its
mirror image, in parallel over the processes of a Lightning Fabric launch (or torchrun).

Rank r of w encodes samples r, r + w, r + 2w, ... of each split and writes its own shards; after a barrier, rank 0
writes the index (in sample order, so the cache is the same for any number of processes) and the manifest last.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from selfflow.data.shards.latent_cache import (
    FORMAT,
    MANIFEST,
    SPLITS,
    ShardWriter,
    merge_index,
    read_manifest,
    write_json,
)
from selfflow.tokenizers.image_latent import ImageLatentTokenizer
from selfflow.training.validate import tokenizer_configs

log = logging.getLogger("selfflow")


class IndexedImages(Dataset):
    """`(index, image, label)` of a dataset's items (None for an unreadable file, reported by the dataset)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return None if item is None else (i, item[0], item[1])


def keep_readable(items: list) -> tuple[list[int], torch.Tensor, list[int]] | None:
    kept = [item for item in items if item is not None]
    if not kept:
        return None
    return [i for i, _, _ in kept], torch.stack([image for _, image, _ in kept]), [int(y) for _, _, y in kept]


def source_key(dataset: Dataset, i: int) -> str:
    """What item i was read from: its file path (folders) or tar member (shards)."""
    paths = getattr(dataset, "paths", None)
    return str(paths[i]) if paths is not None else dataset.member_name(i)


def manifest_of(cfg: DictConfig, tokenizer: ImageLatentTokenizer, class_names: list[str]) -> dict[str, Any]:
    c, h, w = tokenizer.latent_shape
    return {
        "format": FORMAT,
        "vae_fingerprint": tokenizer.fingerprint,
        "vae": tokenizer.vae_path,
        "image_size": int(cfg.data.dataset.image_size),
        "crop": str(cfg.data.dataset.get("crop", "center")),
        "latent_channels": c,
        "latent_size": [h, w],
        "scale": tokenizer.scale,
        "shift": tokenizer.shift,
        "dtype": "float16",
        "record": "[flip (1: mirrored), (posterior mean, posterior std), C, h, w]",
        "class_names": list(class_names),
        "source": str(cfg.data.get("root")),
    }


def same_cache(existing: dict[str, Any], wanted: dict[str, Any]) -> bool:
    keys = ("vae_fingerprint", "image_size", "crop", "latent_channels", "latent_size", "class_names")
    return all(existing.get(k) == wanted[k] for k in keys)


def encode_split(
    dataset: Dataset,
    tokenizer: ImageLatentTokenizer,
    writer: ShardWriter,
    rank: int,
    world: int,
    batch_size: int,
    num_workers: int,
    progress,
) -> None:
    """This rank's share of `dataset`: posterior (mean, std) of each image and its mirror, float16."""
    share = list(range(rank, len(dataset), world))
    loader = DataLoader(
        IndexedImages(dataset), batch_size=batch_size, sampler=share, num_workers=num_workers, collate_fn=keep_readable
    )
    task = progress.add_task(f"encoding {writer.split}", total=len(loader))
    for batch in loader:
        if batch is not None:
            indices, images, labels = batch  # images: [B, 3, S, S]
            mean, std = tokenizer.posterior(torch.cat([images, images.flip(-1)]))  # [2B, C, h, w] each
            records = rearrange(torch.stack([mean, std]), "m (f b) c h w -> b f m c h w", f=2).half().cpu()
            for index, label, record in zip(indices, labels, records):
                writer.add(index, source_key(dataset, index), label, record)
        progress.advance(task)
    writer.close()


def build_latent_cache(cfg: DictConfig) -> Path:
    """Run `selfflow-cache` from its composed config (the train config plus out_dir, devices, ...)."""
    from lightning.fabric import Fabric
    from rich.progress import Progress

    if "dataset" not in cfg.data or "Latent" in str(cfg.data.dataset.get("_target_", "")):
        raise ValueError(
            "selfflow-cache reads images: use an image data config (data=imagenet, image_folder or "
            "image_shards) with data.root=... and the run's experiment"
        )
    out = Path(cfg.out_dir).expanduser()
    single = cfg.devices == 1 and cfg.num_nodes == 1
    fabric = Fabric(
        accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy="auto" if single else "ddp"
    )
    fabric.launch()
    tokenizer = instantiate(tokenizer_configs(cfg)["image"])
    if not isinstance(tokenizer, ImageLatentTokenizer):
        raise ValueError(
            "selfflow-cache caches VAE latents: choose tokenizer=image_sdvae or tokenizer=image_flux_vae "
            "and tokenizer.image.vae=DIR"
        )
    tokenizer = tokenizer.to(fabric.device).eval()
    dataset = instantiate(cfg.data.dataset, hflip=False)  # both flips are encoded
    datasets = {split: dataset(split=split) for split in SPLITS}
    wanted = manifest_of(cfg, tokenizer, list(getattr(datasets["train"], "class_names", [])))
    if (out / MANIFEST).is_file():
        if same_cache(read_manifest(out), wanted):
            if fabric.is_global_zero:
                print(f"selfflow-cache: {out} already holds this cache; nothing to do")
            return out
        raise ValueError(f"out_dir={out} holds a latent cache of other settings; choose another out_dir")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out_dir={out} is not empty (an interrupted cache?); delete it or choose another out_dir")
    fabric.barrier()  # every rank has looked at an empty folder before any writes into it
    out.mkdir(parents=True, exist_ok=True)
    with Progress(disable=not (cfg.progress and fabric.is_global_zero)) as progress:
        for split, dataset in datasets.items():
            writer = ShardWriter(out, split, fabric.global_rank, cfg.records_per_shard)
            encode_split(
                dataset,
                tokenizer,
                writer,
                fabric.global_rank,
                fabric.world_size,
                cfg.batch_size,
                cfg.data.num_workers,
                progress,
            )
    fabric.barrier()
    if fabric.is_global_zero:
        counts = {split: merge_index(out, split, fabric.world_size) for split in SPLITS}
        write_json(out / MANIFEST, {**wanted, "splits": counts})
        processes = f"{fabric.world_size} process{'es' if fabric.world_size > 1 else ''}"
        print(f"selfflow-cache: {counts} records ({processes}) in {out.resolve()}")
    fabric.barrier()
    return out
