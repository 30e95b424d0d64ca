"""Joint batches: several modalities' datasets in one run, either one modality per step (drawn by
weight) or samples of every modality packed into rows (`data.mode=packed`).

Batches follow (seed, epoch, position) only, like `ResumableBatchSampler`, so a resumed run sees the
same data. The Lightning DataModule over these is `selfflow.training.mixture`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler, default_collate

from selfflow.data.batching.packing import pack
from selfflow.data.batching.rng_state import mix_seed
from selfflow.tokens import PackedTokens, Tokens


class ModalityStreams:
    """Endless per-modality sample orders: permutations of (seed, epoch, modality, cycle), split
    over ranks."""

    def __init__(
        self,
        sizes: dict[str, int],
        offsets: dict[str, int],
        seed: int,
        num_replicas: int,
        rank: int,
    ):
        self.sizes, self.offsets, self.seed = sizes, offsets, seed
        self.num_replicas, self.rank = num_replicas, rank
        self._orders: dict[str, tuple] = {}

    def order(self, modality: str, epoch: int, cycle: int) -> list[int]:
        """This rank's share of one permutation of `modality` (the latest per modality is kept:
        batches read it in turn, so each permutation is drawn once)."""
        key, order = self._orders.get(modality, (None, []))
        if key != (epoch, cycle):
            generator = torch.Generator().manual_seed(
                mix_seed(self.seed, epoch, hash_name(modality), cycle)
            )
            order = torch.randperm(self.sizes[modality], generator=generator)[
                self.rank :: self.num_replicas
            ].tolist()
            self._orders[modality] = ((epoch, cycle), order)
        return order

    def take(self, modality: str, start: int, count: int, epoch: int) -> list[int]:
        """Concat-dataset indices of this rank's samples start..start+count of `modality`
        in `epoch`."""
        per_rank = max(1, self.sizes[modality] // self.num_replicas)
        out = []
        for position in range(start, start + count):
            cycle, within = divmod(position, per_rank)
            order = self.order(modality, epoch, cycle)
            out.append(self.offsets[modality] + order[within % len(order)])
        return out


def hash_name(name: str) -> int:
    """A stable integer for a modality name (Python's hash() changes between processes)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(name))


class MixtureBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of `(concat index, batch seed)`; per_step: each batch one modality drawn by
    weight with that modality's batch size; packed: `batch_size` samples, each of a modality
    drawn by weight.

    The modality draws follow (seed, epoch) only, the same on every rank: per_step, all ranks train
    the same modality at a step (one modality per global batch, the paper's rule); packed, every
    rank packs the same number of samples of each modality (equal work per rank). The samples
    themselves and the batch seeds are per rank.
    """

    def __init__(
        self,
        streams: ModalityStreams,
        weights: dict[str, float],
        batch_size: dict[str, int] | int,
        batches_per_epoch: int,
        mode: str,
        seed: int,
    ):
        self.streams, self.mode, self.seed = streams, mode, seed
        self.names = sorted(weights)
        self.weights = torch.tensor([float(weights[m]) for m in self.names])
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_batches(self, count: int) -> None:
        if count >= len(self):
            self.epoch, count = self.epoch + 1, 0
        self._skip = count

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _choices(self, epoch: int, count: int) -> list[str]:
        """The modality of each of `count` batch slots of `epoch`: rank 0's draw on every rank (see
        the class), so a one-process run draws what it always did."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0, 7))
        return [
            self.names[i]
            for i in torch.multinomial(self.weights, count, replacement=True, generator=generator)
        ]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, skip, self._skip = self.epoch, self._skip, 0
        self.epoch = epoch + 1  # the next iteration is the next epoch, however this one ends
        per_batch = 1 if self.mode == "per_step" else int(self.batch_size)
        choices = self._choices(epoch, len(self) * per_batch)
        used = dict.fromkeys(self.names, 0)
        for b in range(len(self)):
            picks = choices[b * per_batch : (b + 1) * per_batch]
            counts = {
                m: picks.count(m) * (self.batch_size[m] if self.mode == "per_step" else 1)
                for m in set(picks)
            }
            indices = []
            for m in sorted(counts):
                if b >= skip:
                    indices += self.streams.take(m, used[m], counts[m], epoch)
                used[m] += counts[m]
            if b >= skip:
                seed = mix_seed(self.seed, epoch, b, self.streams.rank)
                yield [(i, seed) for i in indices]


class TaggedDataset(Dataset):
    """Items `(modality, data, label)` of one modality's dataset (None stays None:
    skipped files)."""

    def __init__(self, dataset: Dataset, modality: str):
        self.dataset, self.modality = dataset, modality

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return None if item is None else (self.modality, *item)


class GroupCollate:
    """Samples of several modalities -> {"modality": "mixed", "groups": {name: {"data",
    "label"}}, "pack_length"}, or the plain single-modality batch layout when the samples are all
    of one modality."""

    def __init__(self, pack_length: int):
        self.pack_length = pack_length

    def __call__(self, samples: list[Any]) -> dict[str, Any] | None:
        return collate_groups(samples, self.pack_length)


def collate_groups(samples: list[Any], pack_length: int) -> dict[str, Any] | None:
    groups: dict[str, list] = {}
    for sample in samples:
        if sample is not None:
            groups.setdefault(sample[0], []).append(sample[1:])
    if not groups:
        return None
    out = {}
    for modality, items in groups.items():
        data, labels = default_collate(items)
        out[modality] = {"data": data, "label": torch.as_tensor(labels, dtype=torch.long)}
    if len(out) == 1:  # one modality: the plain batch layout every other code path reads
        ((modality, batch),) = out.items()
        return {"modality": modality, **batch}
    return {"modality": "mixed", "groups": out, "pack_length": pack_length}


def pack_groups(
    groups: dict[str, dict[str, Tensor]], tokenizers, pack_length: int, null_label: int
) -> PackedTokens:
    """Tokenize each modality's group, then pack all samples into rows of `pack_length` tokens."""
    samples: list[Tokens] = []
    labels: list[int] = []
    for modality, group in groups.items():
        tokens = tokenizers[modality].encode(group["data"])
        for b in range(tokens.batch_size):
            samples.append(Tokens(tokens.x[b : b + 1], tokens.pos[b : b + 1], modality))
        labels += group["label"].tolist()
    labels = [null_label if label < 0 else label for label in labels]
    return pack(samples, labels, pack_length, null_label)


def check_pack_length(pack_length: int, tokenizers) -> None:
    """At start-up: every sample must fit one packed row."""
    longest = {m: t.positions(1).shape[1] for m, t in tokenizers.items()}
    name, tokens = max(longest.items(), key=lambda kv: kv[1])
    if tokens > pack_length:
        raise ValueError(
            f"data.pack_length={pack_length} is shorter than a {name} sample ({tokens} tokens); "
            f"set data.pack_length >= {tokens}"
        )
