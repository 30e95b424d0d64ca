"""Batching of samples `(data, label)` into `{"modality", "data", "label"}` dicts, dropping
unreadable samples.

Samples may carry further items, dicts of extra conditioning (e.g. `{"caption": str}`, `{"sizes":
[6]}` of multi-aspect data), collated per key into the batch (strings into lists, tensors stacked:
`sizes` -> [B, 6]).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import default_collate


def collate_samples(modality: str) -> Callable[[list[Any]], dict[str, Any] | None]:
    """A collate function for one modality; samples that are None (skipped files) are left out."""

    def collate(samples: list[Any]) -> dict[str, Any] | None:
        kept = [s for s in samples if s is not None]
        if not kept:
            return None
        shapes = {tuple(s[0].shape) for s in kept if isinstance(s[0], torch.Tensor)}
        if len(shapes) > 1:
            raise ValueError(
                f"the {modality} samples of one batch have different shapes {sorted(shapes)}; "
                f"multi-aspect data (buckets) needs the bucket batch sampler of "
                f"SelfFlowDataModule, whose batches each hold one bucket"
            )
        data, labels, *extra = default_collate(kept)
        batch = {
            "modality": modality,
            "data": data,
            "label": torch.as_tensor(labels, dtype=torch.long),
        }
        for conditioning in extra:
            batch.update(conditioning)
        return batch

    return collate
