"""A whole probe evaluation: features of a frozen model at every (layer, level), one head grid per
feature set, and the two baselines beside every number (a randomly initialised model of the same
architecture, the pooled tokenizer input), so that a score is never read alone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from selfflow.evaluation.features import (
    INPUT_LAYER,
    FeatureCache,
    cached_features,
    check_layers,
    check_pool,
    probe_loader,
)
from selfflow.evaluation.linear_probe import (
    LEARNING_RATES,
    WEIGHT_DECAYS,
    check_num_classes,
    fit_linear_probe,
)
from selfflow.models.transformer import SelfFlowTransformer
from selfflow.tokenizers.base import Tokenizer


@dataclass(kw_only=True)
class ProbeRow:
    """One line of the report (the keys of probe.json's `results`).

    Attributes:
        layer: The 1-based block whose output was probed.
        noise_level: The level the clean tokens were noised to before the forward.
        pool: How tokens were pooled: `mean` or `attentive`.
        top1: Test top-1 of the best head on validation, in [0, 1].
        baseline_random_init_top1: The same probe on a randomly initialised model of the
            architecture.
        baseline_input_top1: The same probe on the pooled tokenizer input.
    """

    layer: int
    noise_level: float
    pool: str
    top1: float
    baseline_random_init_top1: float
    baseline_input_top1: float


@dataclass(kw_only=True)
class HeadOptions:
    """How every head grid is trained (see `fit_linear_probe`).

    Attributes:
        learning_rates: The grid's learning rates.
        weight_decays: The grid's weight decays.
        epochs: Passes over the fitting features.
        batch_size: Samples per SGD step.
        val_fraction: The share of the training split held out to pick the best head.
    """

    learning_rates: Sequence[float] = LEARNING_RATES
    weight_decays: Sequence[float] = WEIGHT_DECAYS
    epochs: int = 100
    batch_size: int = 256
    val_fraction: float = 0.1


@dataclass
class FeatureSources:
    """What identifies each feature set in the cache besides layer, level, pool and split.

    Attributes:
        model: The probed model's identity (e.g. checkpoint digest and weights).
        random_init: The random baseline's identity (e.g. the architecture's config).
        data: The dataset config.
    """

    model: dict = field(default_factory=dict)  # e.g. checkpoint digest and weights
    random_init: dict = field(default_factory=dict)  # e.g. the architecture's config
    data: dict = field(default_factory=dict)  # the dataset config


def random_init_like(model: SelfFlowTransformer, seed: int = 0) -> SelfFlowTransformer:
    """The same architecture with random weights, seeded: what the architecture alone gives. Its own
    (adaLN-Zero) initialisation would not do: every block starts as the identity there, so its
    features would be a linear map of the input tokens, the input baseline again. So the blocks'
    modulation layers are drawn like the other linears (Xavier) and their gates start at 1: each
    block is a random pre-norm transformer block.

    Args:
        model: The trained model whose architecture is copied (its weights are not touched).
        seed: Seeds the random weights; the global random state is left as it was.

    Returns:
        A copy with random weights, in eval mode.
    """
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        fresh.initialize_weights()
        for block in fresh.blocks:
            modulation = block.adaLN_modulation[-1]
            nn.init.xavier_uniform_(modulation.weight)
            modulation.bias.zero_()
            modulation.bias.view(6, -1)[2::3] = (
                1.0  # shift, scale, gate for attention, then for the MLP
            )
    return fresh.eval()


def modality_sources(datamodule) -> dict:
    """{modality: single-modality data module}: the data module itself, or the sources of a
    multi-modal mixture.

    Args:
        datamodule (LightningDataModule): A single-modality data module or a mixture with `sources`.

    Returns:
        dict[str, LightningDataModule]: Modality -> its data module.
    """
    sources = getattr(datamodule, "sources", None)
    return dict(sources) if sources else {datamodule.modality: datamodule}


def best_row(rows: Sequence[ProbeRow]) -> ProbeRow:
    """The highest test top-1 (the first of equals, so the report is deterministic).

    Args:
        rows: The report's rows, at least one.

    Returns:
        The row with the highest `top1`.
    """
    return max(rows, key=lambda row: row.top1)


def report(checkpoint: str, dataset: str, rows: Sequence[ProbeRow]) -> dict:
    """The probe.json document.

    Args:
        checkpoint: The probed checkpoint's path.
        dataset: The dataset's name.
        rows: Every (layer, level) row.

    Returns:
        {checkpoint, dataset, results: every row, best: the best row}, JSON-able.
    """
    return {
        "checkpoint": checkpoint,
        "dataset": dataset,
        "results": [asdict(r) for r in rows],
        "best": asdict(best_row(rows)),
    }


def probe_representations(
    model: SelfFlowTransformer,
    tokenizer: Tokenizer,
    train_set: Dataset,
    test_set: Dataset,
    num_classes: int,
    layers: Sequence[int],
    noise_levels: Sequence[float],
    pool: str = "mean",
    *,
    seed: int = 0,
    heads: HeadOptions | None = None,
    cache: FeatureCache | None = None,
    sources: FeatureSources | None = None,
    feature_batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
) -> list[ProbeRow]:
    """Probe `model` at every (layer, level) with both baselines (train fits, test scores).

    Args:
        model: The frozen model (EMA weights) whose features are probed.
        tokenizer: Turns the datasets' samples into the model's tokens.
        train_set: Labelled samples the heads fit on (a validation share is carved from them).
        test_set: Labelled samples the heads are scored on.
        num_classes: The classes of the datasets, at least 2.
        layers: 1-based blocks to probe.
        noise_levels: Levels in [0, 1] the clean tokens are noised to before the forward.
        pool: `mean` or `attentive` pooling of the tokens.
        seed: Seeds the noise, the random baseline, the validation split and the batch order.
        heads: How the head grids are trained; None for the defaults.
        cache: Where features are kept between runs; None computes them every time.
        sources: What identifies each feature set in the cache.
        feature_batch_size: Samples per feature-extraction batch.
        num_workers: Data-loader workers.
        progress: Show progress bars.

    Returns:
        One row per (level, layer), levels major.

    Raises:
        ValueError: An unknown pool, < 2 classes, layers outside the model, levels outside [0, 1].
    """
    layers = check_layers(layers, model.depth)
    splits = {"train": train_set, "test": test_set}
    grid = ProbeGrid(
        tokenizer=tokenizer,
        loaders=split_loaders(splits, tokenizer.modality, feature_batch_size, num_workers),
        levels=check_levels(noise_levels),
        pool=pool,
        num_classes=num_classes,
        heads=heads or HeadOptions(),
        cache=cache,
        sources=sources or FeatureSources(),
        seed=seed,
        progress=progress,
    )
    trained = grid.features("model", model, "model", [INPUT_LAYER, *layers])
    random = grid.features("random-init", random_init_like(model, seed), "random_init", layers)
    return grid.rows(trained, random, layers)


def split_loaders(
    splits: dict[str, Dataset], modality: str, batch_size: int, num_workers: int
) -> dict[str, DataLoader]:
    """Split name -> the feature-extraction loader of its dataset (`probe_loader`).

    Args:
        splits: Split name -> labelled dataset.
        modality: The datasets' modality.
        batch_size: Samples per batch.
        num_workers: Data-loader workers.

    Returns:
        Split name -> its loader.
    """
    loaders = {}
    for split, dataset in splits.items():
        loaders[split] = probe_loader(dataset, modality, batch_size, num_workers)
    return loaders


def check_levels(noise_levels: Sequence[float]) -> list[float]:
    """The probe's noise levels as floats, each in [0, 1].

    Args:
        noise_levels: The `noise_levels` asked for.

    Returns:
        The levels.

    Raises:
        ValueError: No level, or one outside [0, 1].
    """
    if not noise_levels or any(not 0.0 <= float(t) <= 1.0 for t in noise_levels):
        raise ValueError(
            f"noise_levels={list(noise_levels)} must be a non-empty list of levels in [0, 1] "
            f"(0 = clean data, 1 = pure noise)"
        )
    return [float(t) for t in noise_levels]


@dataclass(kw_only=True)
class ProbeGrid:
    """What every feature set and head grid of one probe evaluation shares: the data, the levels
    and pool, how heads train, the cache, the seed.

    Attributes:
        tokenizer: Turns the samples into the model's tokens.
        loaders: `train` and `test` -> the split's data loader.
        levels: The noise levels probed.
        pool: `mean` or `attentive`.
        num_classes: The datasets' classes.
        heads: How the head grids are trained.
        cache: Where features are kept between runs; None for none.
        sources: What identifies each feature set in the cache.
        seed: Seeds the noise, the validation split and the batch order.
        progress: Show progress bars.
    """

    tokenizer: Tokenizer
    loaders: dict[str, DataLoader]
    levels: list[float]
    pool: str
    num_classes: int
    heads: HeadOptions
    cache: FeatureCache | None
    sources: FeatureSources
    seed: int
    progress: bool

    def __post_init__(self):
        check_pool(self.pool)
        check_num_classes(self.num_classes, "the dataset")

    def features(self, name: str, backbone, source: str, wanted: Sequence[int]) -> dict[str, dict]:
        """Features of `backbone` at the `wanted` layers and every level, per split.

        Args:
            name: The model's name in progress bars.
            backbone (SelfFlowTransformer): The model whose features are taken.
            source: `model` or `random_init`: which of `sources` identifies it in the cache.
            wanted: The layers (INPUT_LAYER for the tokenizer input).

        Returns:
            Split -> {(layer, level): features}.
        """
        identity = {"source": source, **getattr(self.sources, source), "data": self.sources.data}
        return {
            split: cached_features(
                self.cache,
                {**identity, "split": split},
                backbone,
                self.tokenizer,
                loader,
                wanted,
                self.levels,
                self.pool,
                self.seed,
                self.progress,
                f"{name} features ({split})",
            )
            for split, loader in self.loaders.items()
        }

    def score(self, per_split: dict[str, dict], key: tuple[int, float], name: str) -> float:
        """Test top-1 of the head grid fit on one feature set (the head best on validation).

        Args:
            per_split: Split -> {(layer, level): features}.
            key: The (layer, level) probed.
            name: The probe's name in progress bars.

        Returns:
            The test top-1.
        """
        heads = self.heads
        fit = fit_linear_probe(
            per_split["train"][key],
            per_split["test"][key],
            self.num_classes,
            heads.learning_rates,
            heads.weight_decays,
            heads.epochs,
            heads.batch_size,
            val_fraction=heads.val_fraction,
            seed=self.seed,
            progress=self.progress,
            description=name,
        )
        return fit.top1

    def rows(self, trained: dict, random: dict, layers: Sequence[int]) -> list[ProbeRow]:
        """The report's rows, levels major: each layer of the trained model beside the same probe
        on the random-init model and on the input.

        Args:
            trained: The trained model's features (the input's included).
            random: The random-init model's features.
            layers: The probed layers.

        Returns:
            One row per (level, layer).
        """
        rows = []
        for level in self.levels:
            input_top1 = self.score(trained, (INPUT_LAYER, level), f"input t={level:g}")
            for layer in layers:
                key, where = (layer, level), f"layer {layer} t={level:g}"
                row = ProbeRow(
                    layer=layer,
                    noise_level=level,
                    pool=self.pool,
                    top1=self.score(trained, key, where),
                    baseline_random_init_top1=self.score(random, key, f"random-init {where}"),
                    baseline_input_top1=input_top1,
                )
                rows.append(row)
        return rows
