"""A data order that survives a restart: batches as a pure function of (seed, epoch, position),
resumable mid-epoch.

`ResumableBatchSampler` shuffles each epoch with its own generator (no draw from the global RNG) and
can start an epoch part-way through; `SeededSamples` runs each batch's loading under a seed derived
from the same (seed, epoch, batch), so random augmentation gives the same result whether or not the
run was interrupted, with or without DataLoader workers. `ResumableBucketBatchSampler` does the
same for bucketed data (each batch one bucket).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from selfflow.data.batching.buckets import BucketBatchSampler, BucketIndex
from selfflow.data.batching.rng_state import mix_seed, seeded_rng


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields batches of `(sample index, batch seed)` pairs for this rank.

    Each epoch is a permutation drawn from (seed, epoch) (or the identity if not shuffled), split
    over `num_replicas` ranks; `drop_last` keeps only full batches. Each iteration is the next
    epoch; `set_epoch(e)` and `skip_batches(k)` make the next iteration start at batch k of epoch e
    (resuming mid-epoch). `len()` is always the full epoch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.shuffle, self.num_replicas, self.rank = shuffle, num_replicas, rank
        per_rank = num_samples // num_replicas
        # with too few samples for one full batch, keep the partial batch rather than
        # yielding nothing
        self.drop_last = drop_last and per_rank >= batch_size
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_batches(self, count: int) -> None:
        """Start the next iteration after `count` batches of the current epoch (an end-of-epoch
        position moves on to the start of the next epoch)."""
        if count >= len(self):
            self.epoch, count = self.epoch + 1, 0
        self._skip = count

    def __len__(self) -> int:
        per_rank = self.num_samples // self.num_replicas
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """[num_samples // num_replicas] this rank's sample indices for `epoch`."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        per_rank = self.num_samples // self.num_replicas
        return order[self.rank :: self.num_replicas][:per_rank]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, skip, self._skip = self.epoch, self._skip, 0
        self.epoch = epoch + 1  # the next iteration is the next epoch, however this one ends
        indices = self.order(epoch).tolist()
        for b in range(skip, len(self)):
            batch = indices[b * self.batch_size : (b + 1) * self.batch_size]
            seed = mix_seed(self.seed, epoch, b, self.rank)
            yield [(i, seed) for i in batch]


def resumable_loader(
    dataset: Dataset,
    batch_sampler: Sampler,
    collate_fn,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """The training loader over `batch_sampler`'s `(index, batch seed)` batches, with its
    own generator: without one, every new iterator (each epoch, without persistent workers) draws
    its workers' base seed from the global RNG, between the checkpoint at an epoch's last batch and
    the next step, so a run resumed from that checkpoint would draw other noise than the run that
    went on."""
    return DataLoader(
        SeededSamples(dataset),
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed),
    )


def trained_position(trainer) -> dict[str, int]:
    """Where training is in the data: the epoch and how many of its batches the trainer took.
    Counted by the trainer's loop, not read from the sampler, which the loader (and its workers)
    may have run ahead of it: at an epoch's last batch the sampler has often moved on to the next
    epoch already."""
    return {
        "epoch": int(trainer.current_epoch),
        "batches_done": int(trainer.fit_loop.epoch_loop.batch_progress.current.ready),
    }


POSITION_KEYS = ("epoch", "batches_done")


def stored_position(state: Any) -> dict[str, int] | None:
    """A data position read from a checkpoint (`trained_position`'s dict; empty: none), or
    ValueError in one line: a checkpoint is a file from someone else, and its data state is data
    like any other."""
    if not state:
        return None
    whole = isinstance(state, Mapping) and all(
        isinstance(state.get(key), int) and not isinstance(state[key], bool) and state[key] >= 0
        for key in POSITION_KEYS
    )
    if not whole:
        raise ValueError(
            f"the checkpoint's data position {state!r:.80} is not {{epoch: N, batches_done: N}}: "
            "the checkpoint is damaged or not selfflow's; resume from a checkpoint selfflow "
            "wrote, or start a new run (another run_dir)"
        )
    return {key: int(state[key]) for key in POSITION_KEYS}


class SeededSamples(Dataset):
    """Wraps a map-style dataset: item `(index, seed)` loads `dataset[index]` with the RNGs seeded
    from `seed`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with seeded_rng(seed):
            return self.dataset[index]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        """One seeding per batch (the DataLoader fetches a whole batch through this). A dataset
        class with a `load_batch` (shards: the batch's reads in flight at once) loads the batch
        itself; looked up on the class, so that a wrapper forwarding attributes (captions) keeps its
        own items."""
        indices = [index for index, _ in keys]
        with seeded_rng(keys[0][1] if keys else 0):
            if hasattr(type(self.dataset), "load_batch"):
                return self.dataset.load_batch(indices)
            return [self.dataset[index] for index in indices]


class ResumableBucketBatchSampler(ResumableBatchSampler):
    """`ResumableBatchSampler` (same `(index, batch seed)` batches, `set_epoch` / `skip_batches`
    resume) whose batches each hold one bucket, in `BucketBatchSampler`'s order: a pure function of
    (seed, epoch), sharded over ranks. A bucket's partial batch is dropped, unless no bucket fills a
    batch at all."""

    def __init__(
        self,
        bucket_ids: Sequence[int],
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        super().__init__(
            len(bucket_ids),
            batch_size,
            seed=seed,
            shuffle=True,
            drop_last=True,
            num_replicas=num_replicas,
            rank=rank,
        )
        self.buckets = BucketBatchSampler(
            bucket_ids, batch_size, seed=seed, drop_last=True, num_replicas=num_replicas, rank=rank
        )
        if self.buckets.num_batches() == 0:  # keep partial batches rather than yielding nothing
            self.buckets.drop_last = False
        self.drop_last = self.buckets.drop_last

    def __len__(self) -> int:
        return self.buckets.num_batches()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, skip, self._skip = self.epoch, self._skip, 0
        self.epoch = epoch + 1  # the next iteration is the next epoch, however this one ends
        batches = self.buckets.batches(epoch)
        for b in range(skip, len(batches)):
            seed = mix_seed(self.seed, epoch, b, self.rank)
            yield [(BucketIndex(i), seed) for i in batches[b]]


def check_loader_options(batch_size: int, num_workers: int, key: str = "data.batch_size") -> None:
    """Batch size (samples per step) and loader worker count of a data module."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{key}={batch_size!r} must be an integer >= 1")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(
            f"data.num_workers={num_workers!r} must be an integer >= 0 (0 "
            f"loads in the training process)"
        )
