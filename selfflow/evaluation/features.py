"""Frozen-backbone features for probing: noised inputs at fixed levels, hidden states at chosen
blocks, pooled over each sample's valid tokens, with an on-disk cache so that a second probe on the
same features costs no forward.

Layer 0 stands for the tokenizer's own output (pixels, frames, mel patches): the input baseline of
a probe.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from selfflow.data.batching.collate import collate_samples
from selfflow.flow.path import interpolate
from selfflow.io.safe_files import replace_atomically
from selfflow.models.transformer import SelfFlowTransformer
from selfflow.objectives.selfflow import default_layers
from selfflow.tokenizers.base import Tokenizer
from selfflow.tokens import Condition

POOLS = ("mean", "attentive")
INPUT_LAYER = 0  # the tokenizer output, before the backbone


@dataclass
class Features:
    """Features of one split at one (layer, level).

    x: [M, D] mean-pooled, or [M, N, D] token features for attentive pooling (then `valid: [M, N]`).

    Attributes:
        x: [M, D] mean-pooled features, or [M, N, D] token features for attentive pooling.
        labels: [M] long class ids.
        valid: [M, N] bool, False on padding (token features only); None for pooled features.
    """

    x: Tensor
    labels: Tensor  # [M] long
    valid: Tensor | None = None


def default_probe_layers(depth: int, student_layer: int | None = None) -> list[int]:
    """Every quarter of the depth plus the student layer (the run's, or the method's default).

    Args:
        depth: The model's blocks.
        student_layer: The run's student layer; None for the method's default.

    Returns:
        Sorted 1-based blocks, each once.
    """
    quarters = {max(1, round(depth * q / 4)) for q in (1, 2, 3, 4)}
    student = student_layer if student_layer is not None else default_layers(depth)[0]
    return sorted(quarters | {student})


def check_layers(layers: Iterable[int], depth: int) -> list[int]:
    """The `layers` to probe, sorted and each once, all within the model's blocks.

    Args:
        layers: 1-based blocks.
        depth: The model's blocks.

    Returns:
        The sorted distinct layers.

    Raises:
        ValueError: No layer, or a layer outside 1..depth.
    """
    layers = sorted({int(layer) for layer in layers})
    bad = [layer for layer in layers if not 1 <= layer <= depth]
    if bad or not layers:
        raise ValueError(
            f"layers={bad or layers} out of range: this model has blocks 1..{depth} "
            f"(1-based); pass layers=[...] within that range or leave it null for the defaults"
        )
    return layers


def check_pool(pool: str) -> str:
    """A pooling of the tokens this module knows.

    Args:
        pool: `mean` or `attentive`.

    Returns:
        The pool, unchanged.

    Raises:
        ValueError: An unknown pool.
    """
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r} is unknown; choose one of {POOLS}")
    return pool


def mean_pool(h: Tensor, valid: Tensor | None) -> Tensor:
    """h: [B, N, D] -> [B, D], the mean over each sample's valid tokens.

    Args:
        h: [B, N, D] token features.
        valid: [B, N] bool, False on padding; None when every token counts.

    Returns:
        [B, D] the mean features.
    """
    if valid is None:
        return h.mean(dim=1)
    weights = valid.to(h.dtype)[..., None]  # [B, N, 1]
    return (h * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def padding_mask(valid: Tensor | None) -> Tensor | None:
    """valid: [B, N] -> [B, 1, N, N] bool: every token attends to the sample's valid tokens only.

    Args:
        valid: [B, N] bool, False on padding; None when every token is valid.

    Returns:
        [B, 1, N, N] bool attention mask, or None for full attention.
    """
    if valid is None:
        return None
    return valid[:, None, None, :].expand(-1, 1, valid.shape[1], -1)


def probe_loader(
    dataset: Dataset, modality: str, batch_size: int = 256, num_workers: int = 0
) -> DataLoader:
    """A fixed-order loader: the same samples in the same order every time, so the seeded
    noise repeats.

    Args:
        dataset: Labelled samples of one modality.
        modality: Their modality (how they are collated).
        batch_size: Samples per batch.
        num_workers: Loader worker processes.

    Returns:
        An unshuffled loader.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_samples(modality),
    )


def _stack(parts: list[Tensor], valids: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Token features of batches with different token counts, padded to the longest: [M, N, D],
    [M, N]."""
    longest = max(p.shape[1] for p in parts)
    x = torch.cat([F.pad(p, (0, 0, 0, longest - p.shape[1])) for p in parts])
    valid = torch.cat([F.pad(v, (0, longest - v.shape[1]), value=False) for v in valids])
    return x, valid


@torch.no_grad()
def _level_features(
    model, tokens, noise: Tensor, level: float, layers: Sequence[int], valid: Tensor, pool: str
) -> dict[int, Tensor]:
    """Layer -> the batch's features (pooled with `pool`, on the CPU) at noise level `level`."""
    x0 = tokens.x.float()  # [B, N, C]
    t = torch.full((x0.shape[0],), level, device=x0.device)
    blocks = tuple(layer for layer in layers if layer != INPUT_LAYER)
    hidden = hidden_states(model, tokens, interpolate(x0, noise, t), t, blocks)
    pooled = {}
    for layer in layers:
        h = hidden[layer].float()  # [B, N, D]
        pooled[layer] = (mean_pool(h, valid) if pool == "mean" else h).cpu()
    return pooled


def extract_features(
    model: SelfFlowTransformer | None,
    tokenizer: Tokenizer,
    loader: Iterable,
    layers: Sequence[int],
    levels: Sequence[float],
    pool: str = "mean",
    seed: int = 0,
    progress: bool = False,
    description: str = "features",
) -> dict[tuple[int, float], Features]:
    """Features at every (layer, level): one backbone forward per batch and level covers all layers.

    The noise is drawn once per batch from a generator seeded with `seed` (the same for every level
    and run); the condition is the null label, so that the features never see the answer.

    Args:
        model: The frozen backbone; None when only layer 0 is asked for.
        tokenizer: Encodes the loader's samples.
        loader: Batches with `data` and `label` (None for a batch of unreadable files).
        layers: Blocks to read, 1-based; 0 is the tokenizer output (the input baseline).
        levels: Noise levels in [0, 1] the clean tokens are noised to.
        pool: `mean` ([M, D] features) or `attentive` ([M, N, D] token features).
        seed: Seeds the noise.
        progress: Show a progress bar.
        description: The progress bar's label.

    Returns:
        (layer, level) -> the features of every sample.

    Raises:
        ValueError: An unknown pool, layers >= 1 without a model, or no readable sample.
    """
    check_pool(pool)
    blocks = tuple(layer for layer in layers if layer != INPUT_LAYER)
    if blocks and model is None:
        raise ValueError("a model is needed for features of layers >= 1")
    device = next(model.parameters()).device if model is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    parts: dict[tuple[int, float], list[Tensor]] = {
        (layer, float(t)): [] for layer in layers for t in levels
    }
    valids, labels = [], []  # per batch: [B, N] padding masks, [B] labels
    for batch in shown_batches(loader, progress, description):
        if batch is None:  # every file of the batch was unreadable
            continue
        tokens = tokenizer.encode(batch["data"].to(device))
        x0 = tokens.x.float()  # [B, N, C]
        ones = torch.ones(x0.shape[:2], dtype=torch.bool, device=x0.device)
        valid = tokens.valid if tokens.valid is not None else ones
        noise = torch.randn(x0.shape, generator=generator).to(device)
        for level in levels:
            features = _level_features(model, tokens, noise, float(level), layers, valid, pool)
            for layer, value in features.items():
                parts[(layer, float(level))].append(value)
        valids.append(valid.cpu())
        labels.append(batch["label"].cpu())
    if not labels:
        raise ValueError("no readable samples to extract features from; check the dataset")
    return gathered(parts, valids, torch.cat(labels), pool)


def shown_batches(loader: Iterable, progress: bool, description: str) -> Iterable:
    """The loader, under a progress bar when asked (none without a terminal: tqdm's
    disable=None).

    Args:
        loader: The batches.
        progress: Show a bar.
        description: The bar's label.

    Returns:
        The batches to iterate.
    """
    if not progress:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=description, unit="batch", leave=False, disable=None)


def hidden_states(
    model: SelfFlowTransformer | None,
    tokens,
    x_t: Tensor,
    t: Tensor,
    blocks: tuple[int, ...],
) -> dict[int, Tensor]:
    """The noised input and the outputs of `blocks` in one forward that stops after the last of
    them, conditioned on nothing (the null label).

    Args:
        model: The backbone; None when no block is asked for.
        tokens (Tokens): The clean tokens (positions, padding, modality).
        x_t: [B, N, C] the tokens noised to `t`.
        t: [B] the level.
        blocks: 1-based blocks to read.

    Returns:
        Layer -> [B, N, D] hidden state (INPUT_LAYER: `x_t`).
    """
    hidden = {INPUT_LAYER: x_t}
    if blocks:
        out = model(
            replace(tokens, x=x_t),
            t[:, None],
            None,
            Condition(),
            attn_mask=padding_mask(tokens.valid),
            hidden_layers=blocks,
            stop_after=max(blocks),
        )
        hidden.update(out.hidden)
    return hidden


def gathered(
    parts: dict[tuple[int, float], list[Tensor]],
    valids: list[Tensor],
    labels: Tensor,
    pool: str,
) -> dict[tuple[int, float], Features]:
    """Each key's per-batch features joined into one `Features` (token features padded to the
    longest sample).

    Args:
        parts: (layer, level) -> the batches' features.
        valids: The batches' [B, N] padding masks.
        labels: [M] every sample's label.
        pool: `mean` or `attentive`.

    Returns:
        (layer, level) -> the features of every sample.
    """
    out = {}
    for key, chunks in parts.items():
        if pool == "mean":
            out[key] = Features(torch.cat(chunks), labels)
        else:
            x, valid = _stack(chunks, valids)
            out[key] = Features(x, labels, valid)
    return out


class FeatureCache:
    """Features on disk, one file per key; a key is any JSON-able dict (source, weights, layer,
    level, pool, dataset config, split), hashed into the file name and stored beside the features to
    guard against collisions.

    Args:
        root: The cache folder (`~` expanded).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.hits = self.misses = 0

    def path(self, key: dict) -> Path:
        """The file of a key.

        Args:
            key: What identifies the features (JSON-able).

        Returns:
            `root/<sha256 of the key>.pt`.
        """
        text = json.dumps(key, sort_keys=True, default=str)
        return self.root / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.pt"

    def load(self, key: dict) -> Features | None:
        """The cached features of a key; a missing, unreadable or colliding file is a miss.

        Args:
            key: What identifies the features (JSON-able).

        Returns:
            The features, or None on a miss.
        """
        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            self.misses += 1
            return None
        if stored.get("key") != json.dumps(key, sort_keys=True, default=str):
            self.misses += 1
            return None
        self.hits += 1
        return Features(stored["x"], stored["labels"], stored.get("valid"))

    def save(self, key: dict, features: Features) -> Path:
        """Store features under a key, with the key beside them.

        Args:
            key: What identifies the features (JSON-able).
            features: The features to keep.

        Returns:
            The file written.
        """
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = {
            "key": json.dumps(key, sort_keys=True, default=str),
            "x": features.x,
            "labels": features.labels,
            "valid": features.valid,
        }
        with replace_atomically(path) as file:  # readers never see half a file
            torch.save(stored, file)
        return path


def cached_features(
    cache: FeatureCache | None,
    source: dict,
    model: SelfFlowTransformer | None,
    tokenizer: Tokenizer,
    loader: Iterable,
    layers: Sequence[int],
    levels: Sequence[float],
    pool: str = "mean",
    seed: int = 0,
    progress: bool = False,
    description: str = "features",
) -> dict[tuple[int, float], Features]:
    """`extract_features` through the cache: only the levels with a missing (layer, level) run
    a forward.

    source: what identifies the features besides layer, level and pool (checkpoint digest, weights,
    dataset config, split, seed); without a cache everything is extracted.

    Args:
        cache: Where features are kept; None extracts everything.
        source: What identifies the features besides layer, level and pool.
        model: The frozen backbone; None when only layer 0 is asked for.
        tokenizer: Encodes the loader's samples.
        loader: Batches with `data` and `label`, in a fixed order.
        layers: Blocks to read, 1-based; 0 is the tokenizer output (the input baseline).
        levels: Noise levels in [0, 1].
        pool: `mean` or `attentive`.
        seed: Seeds the noise (part of the cache key).
        progress: Show a progress bar.
        description: The progress bar's label.

    Returns:
        (layer, level) -> the features of every sample, from the cache where it has them.
    """

    def key(layer: int, level: float) -> dict:
        return {**source, "layer": int(layer), "level": float(level), "pool": pool, "seed": seed}

    found: dict[tuple[int, float], Features] = {}
    if cache is not None:
        for layer in layers:
            for level in levels:
                hit = cache.load(key(layer, level))
                if hit is not None:
                    found[(layer, float(level))] = hit
    missing_levels = [t for t in levels if any((layer, float(t)) not in found for layer in layers)]
    if missing_levels:
        fresh = extract_features(
            model, tokenizer, loader, layers, missing_levels, pool, seed, progress, description
        )
        for (layer, level), features in fresh.items():
            if (layer, level) not in found:
                found[(layer, level)] = features
                if cache is not None:
                    cache.save(key(layer, level), features)
    return found
