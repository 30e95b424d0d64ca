"""Lightning DataModule over plain map-style datasets of one modality."""
from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

from selfflow.data.collate import collate_samples


class SelfFlowDataModule(L.LightningDataModule):
    """Train and test datasets yielding `(data, label)`; batches are `{"modality", "data", "label"}` dicts.

    root: where the data lives (shared by the split configs through interpolation; kept for the record).
    """

    def __init__(self, train: Dataset, test: Dataset, modality: str, batch_size: int = 64, num_workers: int = 0,
                 pin_memory: bool = False, root: str | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        if len(train) == 0:
            raise ValueError(f"the training split of data.root={root} holds no samples")
        self.train_set, self.test_set, self.modality = train, test, modality
        self.batch_size, self.num_workers, self.pin_memory, self.root = batch_size, num_workers, pin_memory, root

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
        return self._loader(self.train_set, shuffle=True, drop_last=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False, drop_last=False)
