"""Encode a dataset once into a latent cache (`selfflow-cache`): the VAE posterior of every image
and of its mirror image, of every clip (video VAE) or of every wave (audio VAE), in parallel over
the processes of a Lightning Fabric launch (or torchrun).

Rank r of w encodes samples r, r + w, r + 2w, ... of each split and writes its own shards; after a
barrier, rank 0 writes the index (in sample order, so the cache is the same for any number of
processes) and the manifest last.
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

from selfflow.data.batching.rng_state import seeded_rng
from selfflow.data.shards.latent_cache import (
    CACHED,
    FORMAT,
    MANIFEST,
    SPLITS,
    ShardWriter,
    merge_index,
    read_manifest,
    write_json,
)
from selfflow.tokenizers.audio_vae import AudioVaeTokenizer
from selfflow.tokenizers.image_latent import ImageLatentTokenizer
from selfflow.tokenizers.video_vae import VideoVaeTokenizer
from selfflow.training.validate import tokenizer_configs

log = logging.getLogger("selfflow")

# the tokenizers whose latents a cache holds, by modality, and the configs that choose them
CACHEABLE = {
    "image": (ImageLatentTokenizer, "tokenizer=image_sdvae or image_flux_vae, tokenizer.image.vae"),
    "video": (VideoVaeTokenizer, "tokenizer=video_vae and tokenizer.video.vae=DIR"),
    "audio": (AudioVaeTokenizer, "tokenizer=audio_vae and tokenizer.audio.vae=DIR"),
}


class IndexedImages(Dataset):
    """`(index, sample, label)` of a dataset's items (None for an unreadable file, reported by the
    dataset); each read under a seed of its own index, so that a random crop or placement is the
    same for any number of processes."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        with seeded_rng(i):
            item = self.dataset[i]
        return None if item is None else (i, item[0], item[1])


def keep_readable(items: list) -> tuple[list[int], torch.Tensor, list[int]] | None:
    kept = [item for item in items if item is not None]
    if not kept:
        return None
    return (
        [i for i, _, _ in kept],
        torch.stack([image for _, image, _ in kept]),
        [int(y) for _, _, y in kept],
    )


def source_key(dataset: Dataset, i: int) -> str:
    """What item i was read from: its file path (folders) or tar member (shards)."""
    paths = getattr(dataset, "paths", None)
    return str(paths[i]) if paths is not None else dataset.member_name(i)


RECORDS = {
    "image": "[flip (1: mirrored), (posterior mean, posterior std), C, h, w]",
    "video": "[1, (posterior mean, posterior std), C, T', h, w] (T' latent frames)",
    "audio": "[1, (posterior mean, posterior std), C, L] (L latent frames)",
}


def data_options(dataset: DictConfig, modality: str) -> dict[str, Any]:
    """The data options the modality's latents depend on (`CACHED[modality].keys`), as the run sets
    them (an image crop defaults to center, as the image datasets do)."""
    if modality == "image":
        return {"image_size": int(dataset.image_size), "crop": str(dataset.get("crop", "center"))}
    return {key: dataset.get(key) for key in CACHED[modality].keys}


def manifest_of(cfg: DictConfig, tokenizer, class_names: list[str], modality: str) -> dict:
    channels, *sides = tokenizer.latent_shape
    return {
        "format": FORMAT,
        "modality": modality,
        "flips": CACHED[modality].flips,
        "vae_fingerprint": tokenizer.fingerprint,
        "vae": tokenizer.vae_path,
        **data_options(cfg.data.dataset, modality),
        "latent_channels": channels,
        "latent_size": list(sides),
        "scale": tokenizer.scale,
        "shift": tokenizer.shift,
        "dtype": "float16",
        "record": RECORDS[modality],
        "class_names": list(class_names),
        "source": str(cfg.data.get("root")),
    }


def same_cache(existing: dict[str, Any], wanted: dict[str, Any]) -> bool:
    options = CACHED[wanted["modality"]].keys
    keys = ("vae_fingerprint", "latent_channels", "latent_size", "class_names", *options)
    same_modality = existing.get("modality", "image") == wanted["modality"]
    return same_modality and all(existing.get(k) == wanted[k] for k in keys)


def encode_split(
    dataset: Dataset,
    tokenizer,
    writer: ShardWriter,
    rank: int,
    world: int,
    batch_size: int,
    num_workers: int,
    progress,
) -> None:
    """This rank's share of `dataset`: posterior (mean, std) of each sample (and of an image's
    mirror), float16."""
    share = list(range(rank, len(dataset), world))
    loader = DataLoader(
        IndexedImages(dataset),
        batch_size=batch_size,
        sampler=share,
        num_workers=num_workers,
        collate_fn=keep_readable,
    )
    task = progress.add_task(f"encoding {writer.split}", total=len(loader))
    for batch in loader:
        if batch is not None:
            # data: images [B, 3, S, S], clips [B, T, C, H, W] or waves [B, 1, S]
            indices, data, labels = batch
            flips = CACHED[tokenizer.modality].flips
            views = torch.cat([data, data.flip(-1)]) if flips == 2 else data
            mean, std = tokenizer.posterior(views)  # [F B, C, *latent_size] each
            records = rearrange(torch.stack([mean, std]), "m (f b) ... -> b f m ...", f=flips)
            records = records.half().cpu()
            for index, label, record in zip(indices, labels, records):
                writer.add(index, source_key(dataset, index), label, record)
        progress.advance(task)
    writer.close()


def cache_tokenizer(cfg: DictConfig):
    """The run's VAE tokenizer of the data's modality, or a one-line refusal naming the configs that
    cache (data of one modality; a tokenizer of `CACHEABLE`)."""
    if "dataset" not in cfg.data or "Latent" in str(cfg.data.dataset.get("_target_", "")):
        raise ValueError(
            "selfflow-cache reads images, clips or waves: use a data config of one modality (data="
            "imagenet, image_folder, image_shards, moving_digits, video_folder, spoken_digits, "
            "audio_folder, ...) with data.root=... and the run's experiment"
        )
    modality = str(cfg.data.modality)
    tokenizer = instantiate(tokenizer_configs(cfg)[modality])
    wanted, hint = CACHEABLE.get(modality, (None, "a VAE tokenizer"))
    if wanted is None or not isinstance(tokenizer, wanted):
        raise ValueError(f"selfflow-cache caches VAE latents: choose {hint}")
    return tokenizer


def build_latent_cache(cfg: DictConfig) -> Path:
    """Run `selfflow-cache` from its composed config (the train config plus out_dir,
    devices, ...)."""
    from lightning.fabric import Fabric
    from rich.progress import Progress

    out = Path(cfg.out_dir).expanduser()
    single = cfg.devices == 1 and cfg.num_nodes == 1
    fabric = Fabric(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy="auto" if single else "ddp",
    )
    fabric.launch()
    tokenizer = cache_tokenizer(cfg).to(fabric.device).eval()
    modality = tokenizer.modality
    flips = {"hflip": False} if CACHED[modality].flips == 2 else {}  # both flips are encoded
    dataset = instantiate(cfg.data.dataset, **flips)
    datasets = {split: dataset(split=split) for split in SPLITS}
    class_names = list(getattr(datasets["train"], "class_names", []))
    wanted = manifest_of(cfg, tokenizer, class_names, modality)
    if (out / MANIFEST).is_file():
        if same_cache(read_manifest(out), wanted):
            if fabric.is_global_zero:
                print(f"selfflow-cache: {out} already holds this cache; nothing to do")
            return out
        raise ValueError(
            f"out_dir={out} holds a latent cache of other settings; choose another out_dir"
        )
    if out.exists() and any(out.iterdir()):
        raise ValueError(
            f"out_dir={out} is not empty (an interrupted cache?); delete it "
            f"or choose another out_dir"
        )
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
