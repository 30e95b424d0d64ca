"""Lightning DataModule over plain map-style datasets of one modality, with a data order that resumes exactly."""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from selfflow.data.bad_files import BadFilePolicy
from selfflow.data.collate import collate_samples
from selfflow.training.data_order import ResumableBatchSampler, SeededSamples


class SelfFlowDataModule(L.LightningDataModule):
    """Train and test datasets yielding `(data, label)`; batches are `{"modality", "data", "label"}` dicts.

    root / on_bad_file: where the data lives and what an unreadable file does (skip or error), shared by the split
    configs through interpolation (`data.root=...`, `data.on_bad_file=error`).
    seed: the training order and augmentation follow (seed, epoch, batch); `build_run` sets it to the run's seed.
    The training position (epoch, batches done) is saved in every checkpoint and restored on resume.
    """

    def __init__(self, train: Dataset, test: Dataset, modality: str, batch_size: int = 64, num_workers: int = 0,
                 pin_memory: bool = False, root: str | None = None, seed: int = 0, on_bad_file: str = "skip"):
        super().__init__()
        BadFilePolicy(on_bad_file)  # validates; the split datasets take it through their configs
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        if len(train) == 0:
            raise ValueError(f"the training split of data.root={root} holds no samples")
        self.train_set, self.test_set, self.modality = train, test, modality
        self.batch_size, self.num_workers, self.pin_memory, self.root = batch_size, num_workers, pin_memory, root
        self.seed = seed
        self.train_batches: ResumableBatchSampler | None = None
        self._position_to_load: dict[str, int] | None = None

    @property
    def num_classes(self) -> int:
        return int(getattr(self.train_set, "num_classes", 0))

    @property
    def class_names(self) -> list[str]:
        return list(getattr(self.train_set, "class_names", []))

    def record_skipped_files(self, path) -> None:
        """Have the datasets list every file they skip, with the reason, in `path`."""
        from pathlib import Path

        for dataset in (self.train_set, self.test_set):
            policy = getattr(dataset, "bad_files", None)
            if policy is not None:
                policy.record_path = Path(path)

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, drop_last=drop_last and len(dataset) > self.batch_size,
            num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
            collate_fn=collate_samples(self.modality),
        )

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        self.train_batches = ResumableBatchSampler(
            len(self.train_set), self.batch_size, seed=self.seed, shuffle=True, drop_last=True,
            num_replicas=trainer.world_size if trainer else 1, rank=trainer.global_rank if trainer else 0)
        if self._position_to_load:
            self.train_batches.set_epoch(self._position_to_load["epoch"])
            self.train_batches.skip_batches(self._position_to_load["batches_done"])
            self._position_to_load = None
        return DataLoader(
            SeededSamples(self.train_set), batch_sampler=self.train_batches, num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
            collate_fn=collate_samples(self.modality), generator=torch.Generator().manual_seed(self.seed),
        )

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the data: the epoch and how many of its batches were trained on."""
        trainer = getattr(self, "trainer", None)
        if self.train_batches is None or trainer is None:
            return {}
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        return {"epoch": int(trainer.current_epoch), "batches_done": done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._position_to_load = dict(state) if state else None

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False, drop_last=False)
