"""A cache of VAE posteriors for training from latents (written by `selfflow-cache`, read by
`data=latent_cache`, `video_latent_cache` and `audio_latent_cache`).

Layout of a cache folder:
  manifest.json            what the latents depend on (modality, VAE fingerprint and the data
                           options of `CACHED[modality].keys`: crop and image size for images), the
                           record layout, the class names and the sample count of each split;
                           written last, so it marks a whole cache
  index-<split>.json       per record: the source key (its file), shard, byte offset in the shard,
                           label
  <split>-rNNN-NNNNNN.tar  tar shards written by rank NNN; member `<sample index>.latent` is one
                           record: float16 [flips, (posterior mean, posterior std), C, *latent
                           size]: images 2 flips (flip 1 = the mirrored image) of [C, h, w]; clips
                           1 of [C, T', h, w] (T' latent frames); waves 1 of [C, L] (L latent
                           frames)

Training draws a flip and a posterior sample `mean + std * noise` per step (as REPA) from the batch
seed, so a resumed run draws the same latents. Every number read from these files is bounded before
it sizes anything. A manifest without `modality` (written before video and audio were cached) is an
image cache.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from selfflow.io.model_folders import latent_geometry, vae_fingerprint
from selfflow.io.safe_files import (
    create_temporary,
    finish_temporary,
    resolve_inside,
    write_json_atomically,
)
from selfflow.io.sizes import bounded_bytes, bounded_size

FORMAT = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
RECORD_SUFFIX = ".latent"
MAX_JSON_BYTES = 1 << 31  # an index of ~1.3M ImageNet records is ~60 MB
MAX_RECORD_BYTES = 1 << 28
# a side bounds the L latent frames of long waves too
MAX_LATENT_CHANNELS, MAX_LATENT_SIDE, MAX_CLASSES = 256, 1 << 16, 1_000_000


@dataclass(frozen=True)
class CachedModality:
    """What a cache of one modality's latents holds.

    keys: the data.dataset options the latents depend on (stored in the manifest, compared with the
    run's when the cache is read). flips: 2 for an image and its mirror, 1 for a sample as read.
    sides: the latent axes after the channels (h w; T' h w; L).
    """

    keys: tuple[str, ...]
    flips: int
    sides: int


CACHED = {
    "image": CachedModality(("image_size", "crop"), flips=2, sides=2),
    "video": CachedModality(("num_frames", "image_size", "channels", "fps"), flips=1, sides=3),
    "audio": CachedModality(("sample_rate", "duration"), flips=1, sides=1),
}


def index_name(split: str) -> str:
    return f"index-{split}.json"


def record_shape(channels: int, *sides: int, flips: int = 2) -> tuple[int, ...]:
    """[flip, (mean, std), C, *sides]"""
    return (flips, 2, channels, *sides)


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {what}")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(
            f"{path} is larger than {MAX_JSON_BYTES} bytes; not a selfflow latent cache file"
        )
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); cache again with selfflow-cache"
        ) from error


def write_json(path: Path, value: Any) -> None:
    """Strict JSON written to a new temporary file and renamed: a reader never sees half a file,
    and a link planted under the name is replaced, never written through (`replace_atomically`)."""
    write_json_atomically(path, value, indent=None)


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a finished cache, its fields checked (types and bounds)."""
    path = Path(root).expanduser() / MANIFEST
    manifest = read_json(
        path,
        "data.root must be a folder written by selfflow-cache (an interrupted cache has no "
        "manifest; run selfflow-cache again)",
    )
    try:
        modality = manifest.get("modality", "image")
        kind = CACHED[modality]
        crop, size = (manifest.get(key) for key in ("crop", "image_size"))
        image = modality != "image" or (isinstance(crop, str) and isinstance(size, int))
        ok = (
            manifest["format"] == FORMAT
            and manifest["dtype"] == "float16"
            and manifest.get("flips", 2) == kind.flips
            and len(manifest["latent_size"]) == kind.sides
            and isinstance(manifest["vae_fingerprint"], str)
            and all(plain(manifest[key]) for key in kind.keys)
            and image
            and isinstance(manifest["class_names"], list)
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise ValueError(
            f"{path} is not a selfflow latent cache manifest of format {FORMAT}; cache "
            f"again with selfflow-cache"
        )
    bounded_size(manifest["latent_channels"], MAX_LATENT_CHANNELS, f"{path} latent_channels")
    for side in manifest["latent_size"]:
        bounded_size(side, MAX_LATENT_SIDE, f"{path} latent_size")
    classes = len(manifest["class_names"])
    bounded_size(classes, MAX_CLASSES, f"{path} class_names (count)", minimum=0)
    return manifest


def plain(value: Any) -> bool:
    """A data option as a manifest may hold it: a number, a string or null."""
    return value is None or (isinstance(value, (int, float, str)) and not isinstance(value, bool))


def as_override(value: Any) -> str:
    """A data option as a command line sets it (null for None)."""
    return "null" if value is None else str(value)


def check_manifest(
    manifest: dict[str, Any],
    root: str,
    vae: str | os.PathLike,
    image_size: int,
    crop: str,
    **options,
) -> None:
    """A cache made with another modality, VAE or data options (crop, image size, frames, ...) than
    the run's is refused, naming the difference. `options`: the run's values of the modality's other
    `CACHED` keys."""
    modality = manifest.get("modality", "image")
    wanted_modality = options.pop("modality", "image")
    if modality != wanted_modality:
        raise ValueError(
            f"the latent cache data.root={root} holds {modality} latents, not {wanted_modality}; "
            f"train it with data={'' if modality == 'image' else modality + '_'}latent_cache"
        )
    options = {"image_size": image_size, "crop": crop, **options}
    for key in CACHED[modality].keys:
        if manifest[key] != options.get(key):  # 8 == 8.0: YAML or a command line
            made, wanted = as_override(manifest[key]), as_override(options.get(key))
            raise ValueError(
                f"the latent cache data.root={root} was made with {key}={made}, but this run "
                f"asks for data.dataset.{key}={wanted}; set data.dataset.{key}={made} or cache "
                f"again with selfflow-cache"
            )
    key = f"tokenizer.{modality}.vae"
    fingerprint = vae_fingerprint(vae, key)
    if manifest["vae_fingerprint"] != fingerprint:
        raise ValueError(
            f"the latent cache data.root={root} was made with another VAE (fingerprint "
            f"{manifest['vae_fingerprint'][:16]}, {manifest.get('vae')}) than {key}={vae} "
            f"({fingerprint[:16]}); point {key} at that VAE or cache again"
        )
    if modality != "image":  # the tokenizer refuses latents of another shape than its VAE makes
        return
    channels, factor = latent_geometry(vae, "tokenizer.image.vae")
    wanted = [channels, [image_size // factor, image_size // factor]]
    if [manifest["latent_channels"], list(manifest["latent_size"])] != wanted:
        raise ValueError(
            f"the latent cache data.root={root} declares latents of "
            f"{manifest['latent_channels']} channels and size {manifest['latent_size']}, but "
            f"tokenizer.image.vae={vae} at data.dataset.image_size={image_size} makes "
            f"{wanted[0]} x {wanted[1]}; cache again with selfflow-cache"
        )


class ShardWriter:
    """One rank's records of one split, as tar shards of at most `records_per_shard` records;
    `close()` writes the rank's part of the index (`part-<split>-rNNN.json`) for `merge_index`."""

    def __init__(self, folder: Path, split: str, rank: int, records_per_shard: int = 4096):
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard={records_per_shard} must be >= 1")
        self.folder, self.split, self.rank, self.records_per_shard = (
            folder,
            split,
            rank,
            records_per_shard,
        )
        self.records: list[list[Any]] = []  # [sample index, key, shard name, data offset, label]
        self._tar: tarfile.TarFile | None = None
        self._file = self._temporary = None  # the open shard, under a temporary name until complete
        self._shard_name, self._in_shard, self._shards = "", 0, 0

    def add(self, index: int, key: str, label: int, record: Tensor) -> None:
        """record: float16 [flips, 2, C, *latent_size] of sample `index` (its position in the
        split's dataset)."""
        if self._tar is None or self._in_shard == self.records_per_shard:
            self._next_shard()
        data = record.to(torch.float16).contiguous().numpy().tobytes()
        info = tarfile.TarInfo(f"{index:09d}{RECORD_SUFFIX}")
        info.size = len(data)
        offset = (
            self._tar.offset + tarfile.BLOCKSIZE
        )  # a USTAR header is one block for these short names
        self._tar.addfile(info, io.BytesIO(data))
        self.records.append([int(index), str(key), self._shard_name, offset, int(label)])
        self._in_shard += 1

    def _next_shard(self) -> None:
        self._finish_shard()
        self._shard_name = f"{self.split}-r{self.rank:03d}-{self._shards:06d}.tar"
        self._file, self._temporary = create_temporary(self.folder / self._shard_name)
        # open until the shard is full
        ustar = tarfile.USTAR_FORMAT
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=ustar)  # noqa: SIM115
        self._shards, self._in_shard = self._shards + 1, 0

    def _finish_shard(self) -> None:
        """Close the open shard and rename it into the cache folder (replacing, never following, a
        planted link)."""
        if self._tar is None:
            return
        self._tar.close()
        finish_temporary(self._file, self._temporary, self.folder / self._shard_name)
        self._tar = self._file = self._temporary = None

    def close(self) -> None:
        self._finish_shard()
        write_json(self.folder / f"part-{self.split}-r{self.rank:03d}.json", self.records)


def merge_index(folder: Path, split: str, world_size: int) -> int:
    """Rank 0, after every rank closed its writer: the parts as `index-<split>.json` in sample order
    (the same index for any number of ranks); the parts are removed. Returns the record count."""
    parts = [folder / f"part-{split}-r{rank:03d}.json" for rank in range(world_size)]
    records = sorted(
        (r for part in parts for r in read_json(part, "a rank did not finish")), key=lambda r: r[0]
    )
    shards = sorted({r[2] for r in records})
    shard_ids = {name: i for i, name in enumerate(shards)}
    write_json(
        folder / index_name(split),
        {
            "shards": shards,
            "key": [r[1] for r in records],
            "shard": [shard_ids[r[2]] for r in records],
            "offset": [r[3] for r in records],
            "label": [r[4] for r in records],
        },
    )
    for part in parts:
        part.unlink()
    return len(records)


def overlapping(shard_ids: np.ndarray, offsets: np.ndarray, record_bytes: int) -> bool:
    """Whether two records share bytes: distinct records bound the count by the shards' real size on
    disk, so an index cannot make a batch of records larger than the files that hold them."""
    order = np.lexsort((offsets, shard_ids))
    same_shard = shard_ids[order][1:] == shard_ids[order][:-1]
    return bool((same_shard & (np.diff(offsets[order]) < record_bytes)).any())


class LatentCache(Dataset):
    """Items `(z [C, *latent_size] float32, label)` of a `selfflow-cache` folder, by random access
    through the index.

    random_flip: draw one of the two stored flips per item (else the image as read; caches of clips
    and waves hold one); sample_posterior: z = mean + std * noise (else the mean); both for split
    train only. Both draws use the global RNG, which the training loader seeds per batch.
    modality: what the cache holds (image, video, audio).
    vae / image_size / crop (images), num_frames / image_size / channels / fps (clips),
    sample_rate / duration (waves): the run's; a cache made with another VAE or other options is
    refused.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        vae: str | os.PathLike = "",
        image_size: int = 256,
        crop: str = "adm",
        random_flip: bool = True,
        sample_posterior: bool = True,
        modality: str = "image",
        **options,
    ):
        if split not in SPLITS:
            raise ValueError(f"latent cache split={split!r} is unknown; choose one of {SPLITS}")
        if modality not in CACHED or set(options) - set(CACHED[modality].keys):
            raise ValueError(
                f"data.dataset: a latent cache of modality={modality!r} takes "
                f"{', '.join(CACHED.get(modality, CACHED['image']).keys)}, not {sorted(options)}"
            )
        self.root = Path(root).expanduser()
        manifest = read_manifest(self.root)
        check_manifest(manifest, str(root), vae, image_size, crop, modality=modality, **options)
        self.class_names = [str(name) for name in manifest["class_names"]]
        sides = [int(s) for s in manifest["latent_size"]]
        flips = CACHED[modality].flips
        self.record_shape = record_shape(int(manifest["latent_channels"]), *sides, flips=flips)
        where = f"{self.root / MANIFEST} records"
        self.record_bytes = bounded_bytes(self.record_shape, 2, MAX_RECORD_BYTES, where)
        # the test split (probes) reads the posterior mean of each image as it is
        training = split == "train"
        self.random_flip = random_flip and training and flips == 2
        self.sample_posterior = sample_posterior and training
        self.shards, self.shard_ids, self.offsets, self.labels = self._read_index(split)
        self._fds: dict[int, int] = {}

    def _read_index(self, split: str) -> tuple[list[Path], np.ndarray, np.ndarray, np.ndarray]:
        path = self.root / index_name(split)
        index = read_json(path, f"the latent cache has no {split} split")
        try:
            names = [str(n) for n in index["shards"]]
            shard_ids, offsets, labels = (
                np.asarray(index[k], dtype=np.int64) for k in ("shard", "offset", "label")
            )
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            raise ValueError(
                f"{path} is not a latent cache index ({error}); cache again"
            ) from error
        shards = []
        for name in names:  # plain file names inside the cache folder (links resolved), no more
            if (
                Path(name).name != name
                or not name.endswith(".tar")
                or not (self.root / name).is_file()
            ):
                raise ValueError(
                    f"{path} names shard {name!r}, which is not a .tar file in {self.root}"
                )
            shards.append(resolve_inside(self.root, name))
        sizes = np.asarray([p.stat().st_size for p in shards] or [0], dtype=np.int64)
        lengths = {len(shard_ids), len(offsets), len(labels)}
        if len(lengths) != 1 or not len(labels):
            raise ValueError(f"{path} has no records or lists of different lengths; cache again")
        if (
            shard_ids.min() < 0
            or shard_ids.max() >= len(shards)
            or offsets.min() < 0
            or (offsets + self.record_bytes > sizes[shard_ids]).any()
        ):
            raise ValueError(
                f"{path} points outside its shards (truncated or foreign files); cache again"
            )
        if overlapping(shard_ids, offsets, self.record_bytes):
            raise ValueError(f"{path} lists records that overlap in their shards; cache again")
        if labels.min() < 0 or labels.max() >= max(1, len(self.class_names)):
            raise ValueError(
                f"{path} has labels outside the {len(self.class_names)} classes of the manifest"
            )
        return shards, shard_ids, offsets, labels

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own files
        return {**self.__dict__, "_fds": {}}

    def moments(self, i: int) -> Tensor:
        """The stored record of item i: [flips, (mean, std), C, *latent_size] float32."""
        shard = int(self.shard_ids[i])
        if shard not in self._fds:
            self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        data = os.pread(self._fds[shard], self.record_bytes, int(self.offsets[i]))
        if len(data) != self.record_bytes:
            raise ValueError(
                f"{self.shards[shard]} is truncated (record {i}); cache again with selfflow-cache"
            )
        return torch.from_numpy(
            np.frombuffer(data, dtype=np.float16).reshape(self.record_shape).astype(np.float32)
        )

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        moments = self.moments(i)
        mean, std = moments[int(torch.randint(2, ())) if self.random_flip else 0]  # [C, ...] each
        z = mean + std * torch.randn(mean.shape) if self.sample_posterior else mean
        return z, int(self.labels[i])
