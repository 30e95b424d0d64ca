"""Lightning DataModule over plain map-style datasets of one modality, with a data order that
resumes exactly.

Bucketed datasets (image aspect buckets, `buckets:`; audio or video length buckets, `durations:` /
`frame_counts:`) give every sample's bucket as `bucket_ids`; their training batches then each hold
one bucket (one token grid, no padding), in an order that resumes exactly like the plain one, and
ask for each sample in its bucket (`BucketIndex` keys).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from selfflow.data.batching.collate import collate_samples
from selfflow.data.batching.order import (
    ResumableBatchSampler,
    ResumableBucketBatchSampler,
    check_loader_options,
    resumable_loader,
    stored_position,
    trained_position,
)
from selfflow.io.bad_files import BadFilePolicy


def check_size_conditioning(dataset: Dataset, modality: str, module: Any) -> None:
    """Multi-aspect data and the model's size conditioning go together: one without the other is
    a config mistake, reported before the first step. Bucket sides must also be whole patches of
    the tokenizer."""
    model = getattr(module, "model", None)
    if model is None or not hasattr(model, "size_embedder"):
        return
    bucketing = getattr(dataset, "bucketing", None)
    conditioned = model.size_embedder is not None
    if bucketing is not None and not conditioned:
        raise ValueError(
            "data.dataset.buckets is set (multi-aspect training) but the model has no size "
            "conditioning; add model.size_conditioning=true, or set "
            "data.dataset.buckets=null for square images"
        )
    if bucketing is None and conditioned:
        raise ValueError(
            "model.size_conditioning=true but the training data has no buckets "
            "(data.dataset.buckets is null), so the size embedder would never see a size; set "
            "data.dataset.buckets (e.g. data.dataset.buckets={max_aspect: 2.0}) or "
            "model.size_conditioning=false"
        )
    tokenizers = getattr(module, "tokenizers", {})
    patch = getattr(tokenizers[modality], "patch_size", None) if modality in tokenizers else None
    if bucketing is not None and patch:
        bad = [list(size) for size in bucketing.buckets.sizes if size[0] % patch or size[1] % patch]
        if bad:
            raise ValueError(
                f"data.dataset.buckets sizes {bad} are not multiples of "
                f"tokenizer.{modality}.patch_size={patch}; set "
                f"data.dataset.bucket_multiple={patch} or round the sizes"
            )


def check_length_buckets(dataset: Dataset, modality: str, module: Any) -> None:
    """Length buckets (audio durations, video frame counts) must be whole token patches of a
    tokenizer that takes clips of other lengths."""
    key, lengths = (
        getattr(dataset, "length_bucket_key", None),
        getattr(dataset, "bucket_lengths", None),
    )
    tokenizers = getattr(module, "tokenizers", {})
    if not lengths or modality not in tokenizers:
        return
    tokenizer = tokenizers[modality]
    if not hasattr(tokenizer, "at_length"):
        raise ValueError(
            f"data.dataset.{key}={lengths} needs a tokenizer that takes clips of several lengths "
            f"(tokenizer.{modality}: {type(tokenizer).__name__} takes one); use a pixel or log-mel "
            f"tokenizer (video_tubelets, audio_mel) or set data.dataset.{key}=null"
        )
    for length in lengths:
        try:
            tokenizer.at_length(length)
        except ValueError as error:
            raise ValueError(f"data.dataset.{key}={lengths}: {error}") from None


SPLITS = ("train", "test")

# what a tokenizer needs to know about the samples of its modality: the dataset config names these,
# and the run builds the modality's tokenizer with them (the tokenizer configs hold only their own
# settings, e.g. patch sizes)
GEOMETRY_KEYS = ("channels", "image_size", "num_frames", "fps", "sample_rate", "duration")


def sample_geometry(data: Mapping) -> dict[str, dict[str, Any]]:
    """{modality: {geometry key: value}} of a data config (one modality, or a mixture's `sources`),
    from the options of its `dataset` config: what both splits' samples look like."""
    sources = data.get("sources") or {data["modality"]: data}
    return {
        modality: {key: source["dataset"][key] for key in GEOMETRY_KEYS if key in source["dataset"]}
        for modality, source in sources.items()
    }


def has_captions(data: Mapping) -> bool:
    """Whether a data config's samples come with captions (a captioned dataset class; a mixture
    has none)."""
    from hydra.utils import get_object

    return "sources" not in data and bool(
        getattr(get_object(data["dataset"]["_target_"]), "has_captions", False)
    )


class SelfFlowDataModule(L.LightningDataModule):
    """Train and test splits of one dataset yielding `(data, label)`; batches are `{"modality",
    "data", "label"}` dicts.

    dataset: builds a split, `dataset(split="train")` and `dataset(split="test")` (a `_partial_`
    dataset config holding what both splits share; each dataset class applies its training
    augmentation to split train only). The splits are built on first use, so constructing the module
    reads no data (start-up validation does it to check the options). root / on_bad_file: where the
    data lives and what an unreadable file does (skip or error), passed to the dataset config by
    interpolation (`data.root=...`, `data.on_bad_file=error`).
    seed: the training order and augmentation follow (seed, epoch, batch); `build_run` sets it to
    the run's seed. The training position (epoch, batches done) is saved in every checkpoint and
    restored on resume.
    """

    def __init__(
        self,
        dataset: Callable[..., Dataset],
        modality: str,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        root: str | None = None,
        seed: int = 0,
        on_bad_file: str = "skip",
    ):
        super().__init__()
        BadFilePolicy(on_bad_file)  # validates; the dataset takes it through its config
        check_loader_options(batch_size, num_workers)
        self.dataset, self.modality = dataset, modality
        self.batch_size, self.num_workers, self.pin_memory, self.root = (
            batch_size,
            num_workers,
            pin_memory,
            root,
        )
        self.seed = seed
        self.train_batches: ResumableBatchSampler | None = None
        self._position_to_load: dict[str, int] | None = None
        self._splits: dict[str, Dataset] | None = None

    @classmethod
    def from_splits(
        cls, train: Dataset, test: Dataset, modality: str, **options
    ) -> SelfFlowDataModule:
        """A data module over two datasets built already (a notebook, a test)."""
        return cls(lambda split: {"train": train, "test": test}[split], modality, **options)

    @property
    def splits(self) -> dict[str, Dataset]:
        """{"train": dataset, "test": dataset}, built on first use."""
        if self._splits is None:
            splits = {split: self.dataset(split=split) for split in SPLITS}
            if len(splits["train"]) == 0:
                raise ValueError(f"the training split of data.root={self.root} holds no samples")
            self._splits = splits
        return self._splits

    @property
    def train_set(self) -> Dataset:
        return self.splits["train"]

    @property
    def test_set(self) -> Dataset:
        return self.splits["test"]

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

    def setup(self, stage: str | None = None) -> None:
        """Start-up checks, once the trainer holds the module: buckets <-> the model's size
        conditioning, length buckets <-> the tokenizer."""
        trainer = getattr(self, "trainer", None)
        if stage in (None, "fit") and trainer is not None:
            check_size_conditioning(self.train_set, self.modality, trainer.lightning_module)
            check_length_buckets(self.train_set, self.modality, trainer.lightning_module)
        getattr(
            self.train_set, "bucket_ids", None
        )  # bucket every training sample now (file headers only)

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_samples(self.modality),
        )

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        ranks = {
            "num_replicas": trainer.world_size if trainer else 1,
            "rank": trainer.global_rank if trainer else 0,
        }
        bucket_ids = getattr(self.train_set, "bucket_ids", None)
        if bucket_ids is not None:
            self.train_batches = ResumableBucketBatchSampler(
                bucket_ids, self.batch_size, seed=self.seed, **ranks
            )
        else:
            self.train_batches = ResumableBatchSampler(
                len(self.train_set),
                self.batch_size,
                seed=self.seed,
                shuffle=True,
                drop_last=True,
                **ranks,
            )
        if self._position_to_load:
            self.train_batches.set_epoch(self._position_to_load["epoch"])
            self.train_batches.skip_batches(self._position_to_load["batches_done"])
            self._position_to_load = None
        return resumable_loader(
            self.train_set,
            self.train_batches,
            collate_samples(self.modality),
            self.seed,
            self.num_workers,
            self.pin_memory,
        )

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the data: the epoch and how many of its batches were trained on."""
        trainer = getattr(self, "trainer", None)
        return {} if self.train_batches is None or trainer is None else trained_position(trainer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._position_to_load = stored_position(state)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False, drop_last=False)
