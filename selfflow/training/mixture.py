"""The Lightning DataModule of joint training: several modalities' datasets in one run, one
modality per step (drawn by weight) or samples of every modality packed into rows
(`data.mode=packed`). The batches themselves (sampler, collate, packing) are plain PyTorch in
`selfflow.data.batching.mixture`; they follow (seed, epoch, position) only, so a resumed run
sees the same data.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

import lightning as L
from torch.utils.data import ConcatDataset, DataLoader

from selfflow.data.batching.mixture import (
    GroupCollate,
    MixtureBatchSampler,
    ModalityStreams,
    TaggedDataset,
)
from selfflow.data.batching.order import (
    check_loader_options,
    resumable_loader,
    stored_position,
    trained_position,
)

MODES = ("per_step", "packed")


class MixtureDataModule(L.LightningDataModule):
    """Several single-modality data modules (`sources`) trained together.

    mode: per_step (each step one modality, drawn by `weights`, with its own batch size from
    `batch_size`) or packed (each step `batch_size` samples of mixed modalities, packed by the
    training step into rows of `pack_length` tokens). Labels share one class space across modalities
    (class k means the same in each, as in the built-in digit sets); `num_classes` is the largest of
    the sources'.
    """

    def __init__(
        self,
        sources: dict[str, L.LightningDataModule],
        weights: dict[str, float],
        batch_size: dict[str, int] | int,
        mode: str = "per_step",
        pack_length: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        batches_per_epoch: int | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"data.mode={mode!r} is unknown; choose one of {MODES}")
        weights = {m: float(w) for m, w in weights.items()}
        missing = set(weights) - set(sources)
        if missing:
            raise ValueError(
                f"data.weights names {sorted(missing)} but data.sources has no dataset for them "
                f"(sources: {sorted(sources)})"
            )
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"data.weights={weights} must be >= 0 and sum to a positive value")
        weights = {m: w for m, w in weights.items() if w > 0}
        if mode == "per_step":
            sizes = (
                dict(batch_size)
                if isinstance(batch_size, Mapping)
                else dict.fromkeys(weights, batch_size)
            )
            if set(weights) - set(sizes):
                raise ValueError(
                    f"data.batch_size has no value for {sorted(set(weights) - set(sizes))}"
                )
            for m in weights:
                check_loader_options(sizes[m], num_workers, f"data.batch_size.{m}")
            batch_size = {m: int(sizes[m]) for m in weights}
        elif isinstance(batch_size, Mapping):
            raise ValueError(
                "data.batch_size must be one number (samples per step) with data.mode=packed"
            )
        else:
            check_loader_options(batch_size, num_workers)
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(
                f"data.batches_per_epoch={batches_per_epoch} must be >= 1 (or null: the samples of "
                f"all sources / the mean batch size)"
            )
        self.sources, self.weights, self.batch_size, self.mode = (
            dict(sources),
            weights,
            batch_size,
            mode,
        )
        self.pack_length, self.num_workers, self.seed = pack_length, num_workers, seed
        self.modality = "mixed"
        self.modalities = sorted(weights)
        self._batches_per_epoch = batches_per_epoch
        self.train_batches: MixtureBatchSampler | None = None
        self._position_to_load: dict[str, int] | None = None

    @cached_property
    def train_set(self) -> ConcatDataset:
        """Every source's training split, tagged with its modality, in the order of `modalities`
        (built on first use: constructing the module reads no data)."""
        return ConcatDataset([TaggedDataset(self.sources[m].train_set, m) for m in self.modalities])

    @cached_property
    def test_set(self) -> ConcatDataset:
        return ConcatDataset([TaggedDataset(self.sources[m].test_set, m) for m in self.modalities])

    @property
    def sizes(self) -> dict[str, int]:
        """{modality: training samples}"""
        return {m: len(d.dataset) for m, d in zip(self.modalities, self.train_set.datasets)}

    @property
    def offsets(self) -> dict[str, int]:
        """{modality: index of its first sample in `train_set`}"""
        return dict(zip(self.modalities, [0, *self.train_set.cumulative_sizes[:-1]]))

    @property
    def batches_per_epoch(self) -> int:
        """As given, or the samples of all sources over the mean batch size."""
        if self._batches_per_epoch:
            return self._batches_per_epoch
        batch = self.batch_size
        mean_batch = sum(batch.values()) / len(batch) if isinstance(batch, Mapping) else batch
        return max(1, int(sum(self.sizes.values()) // mean_batch))

    @property
    def num_classes(self) -> int:
        return max(int(getattr(s, "num_classes", 0)) for s in self.sources.values())

    @property
    def class_names(self) -> list[str]:
        return max((list(getattr(s, "class_names", [])) for s in self.sources.values()), key=len)

    def record_skipped_files(self, path) -> None:
        for source in self.sources.values():
            source.record_skipped_files(path)

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        streams = ModalityStreams(self.sizes, self.offsets, self.seed, world, rank)
        self.train_batches = MixtureBatchSampler(
            streams, self.weights, self.batch_size, self.batches_per_epoch, self.mode, self.seed
        )
        if self._position_to_load:
            self.train_batches.set_epoch(self._position_to_load["epoch"])
            self.train_batches.skip_batches(self._position_to_load["batches_done"])
            self._position_to_load = None
        return resumable_loader(
            self.train_set,
            self.train_batches,
            GroupCollate(self.pack_length),
            self.seed,
            self.num_workers,
        )

    def test_dataloader(self) -> DataLoader:
        return DataLoader(
            self.test_set,
            batch_size=32,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=GroupCollate(self.pack_length),
        )

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the data (the trainer's count, however far the loader has
        read ahead)."""
        trainer = getattr(self, "trainer", None)
        return {} if self.train_batches is None or trainer is None else trained_position(trainer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._position_to_load = stored_position(state)
