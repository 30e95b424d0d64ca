"""Linear probes on frozen features: a grid of heads (learning rate x weight decay) trained in one
pass over standardised features, the best picked on a validation split carved from train, top-1
reported on test.

Heads are stacked into one tensor and updated with a hand-written SGD (momentum, cosine decay,
per-head rate and decay), so twenty heads cost one batched matmul per step. With `pool="attentive"`
features every head also learns one query that attention-pools the sample's tokens before its linear
map (the query starts at zero: a mean).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from selfflow.evaluation.features import Features

LEARNING_RATES = (0.01, 0.03, 0.1, 0.3, 1.0)
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)


@dataclass(kw_only=True)
class ProbeFit:
    """The result of a probe: the best head on validation and its test accuracy.

    Attributes:
        top1: Test accuracy of the head best on validation, in [0, 1].
        val_top1: That head's validation accuracy.
        learning_rate: That head's learning rate.
        weight_decay: That head's weight decay.
        head_val_top1: The validation accuracy of every head of the grid, learning rates major.
    """

    top1: float  # test accuracy of the head best on validation, in [0, 1]
    val_top1: float
    learning_rate: float
    weight_decay: float
    head_val_top1: list[float]  # every head of the grid, learning rates major


def check_num_classes(num_classes: int, what: str) -> None:
    """Unlabelled data (no classes at all) cannot be probed: stop before any feature is extracted.

    Args:
        num_classes: The classes the data set has.
        what: The data's name in the error message (`the training split`).

    Raises:
        ValueError: Fewer than 2 classes.
    """
    if num_classes < 2:
        raise ValueError(
            f"{what} has {num_classes} classes: a linear probe needs labelled data with at least 2 "
            f"classes (an image/audio/video folder with one sub-folder per class)"
        )


def check_labels(labels: Tensor, num_classes: int, what: str) -> None:
    """A probe needs a class for every sample; unlabelled samples (label -1) stop here.

    Args:
        labels: [M] class ids of the samples.
        num_classes: The classes the data set has.
        what: The data's name in the error message (`the training split`).

    Raises:
        ValueError: Fewer than 2 classes, a sample without a label, or a label past `num_classes`.
    """
    check_num_classes(num_classes, what)
    unlabelled = int((labels < 0).sum())
    if unlabelled:
        raise ValueError(
            f"{what} has {unlabelled} of {len(labels)} samples without a label (-1): a linear "
            f"probe needs every sample in a class sub-folder"
        )
    if int(labels.max()) >= num_classes:
        raise ValueError(f"{what} has label {int(labels.max())} but only {num_classes} classes")


def validation_split(num: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed (fit, validation) partition of range(num).

    Args:
        num: Samples in the training split.
        fraction: The share of them held out for validation, in (0, 1); at least one each side.
        seed: Seeds the permutation, so that the split is the same on every run.

    Returns:
        (fit indices, validation indices), disjoint and covering range(num).

    Raises:
        ValueError: `fraction` outside (0, 1) or fewer than 2 samples.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction={fraction} must be in (0, 1)")
    if num < 2:
        raise ValueError(
            f"the training split has {num} sample(s); a probe needs at least 2 (fit and validation)"
        )
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    n_val = min(num - 1, max(1, round(num * fraction)))
    return order[n_val:], order[:n_val]


class Standardizer:
    """Per-channel mean and std of the fitting features (over valid tokens for token features).

    Args:
        features: The features the probes fit on; calling the standardizer maps x to (x - mean) /
            std.
    """

    def __init__(self, features: Features):
        x = (
            features.x if features.valid is None else features.x[features.valid]
        )  # [M(, N), D] -> [*, D]
        x = x.reshape(-1, x.shape[-1]).double()
        self.mean, self.std = x.mean(0).float(), x.std(0).float().clamp_min(1e-6)

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class HeadGrid:
    """H heads (linear, optionally preceded by an attentive pooling query) evaluated in one
    batched pass.

    Args:
        heads: H, the number of heads (one per learning rate and weight decay).
        dim: D, the feature width.
        num_classes: K, the classes.
        attentive: Give every head a query that attention-pools token features (starts as the mean).
    """

    def __init__(self, heads: int, dim: int, num_classes: int, attentive: bool):
        self.weight = torch.zeros(heads, dim, num_classes, requires_grad=True)
        self.bias = torch.zeros(heads, num_classes, requires_grad=True)
        self.query = torch.zeros(heads, dim, requires_grad=True) if attentive else None

    @property
    def params(self) -> list[Tensor]:
        return [p for p in (self.weight, self.bias, self.query) if p is not None]

    def logits(self, x: Tensor, valid: Tensor | None) -> Tensor:
        """x: [B, D] or tokens [B, N, D] with valid [B, N] -> logits [H, B, K].

        Args:
            x: [B, D] pooled features, or [B, N, D] token features for attentive heads.
            valid: [B, N] bool, False on padding tokens; None when every token counts.

        Returns:
            [H, B, K] every head's logits.
        """
        if self.query is None:
            return torch.einsum("bd,hdk->hbk", x, self.weight) + self.bias[:, None]
        scores = torch.einsum("hd,bnd->hbn", self.query, x) / math.sqrt(x.shape[-1])
        if valid is not None:
            scores = scores.masked_fill(~valid[None], float("-inf"))
        pooled = torch.einsum("hbn,bnd->hbd", scores.softmax(dim=-1), x)  # [H, B, D]
        return torch.einsum("hbd,hdk->hbk", pooled, self.weight) + self.bias[:, None]

    @torch.no_grad()
    def accuracy(
        self, x: Tensor, valid: Tensor | None, labels: Tensor, batch_size: int = 1024
    ) -> Tensor:
        """[H] top-1 of every head.

        Args:
            x: [M, D] or [M, N, D] standardised features.
            valid: [M, N] bool for token features, or None.
            labels: [M] class ids.
            batch_size: Samples per evaluation batch.

        Returns:
            [H] the accuracy of every head, in [0, 1].
        """
        correct = torch.zeros(self.weight.shape[0])
        for start in range(0, len(labels), batch_size):
            end = start + batch_size
            logits = self.logits(x[start:end], None if valid is None else valid[start:end])
            correct += (logits.argmax(-1) == labels[start:end]).sum(dim=1).float()
        return correct / max(1, len(labels))


def fit_linear_probe(
    train: Features,
    test: Features,
    num_classes: int,
    learning_rates: Sequence[float] = LEARNING_RATES,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    epochs: int = 100,
    batch_size: int = 256,
    momentum: float = 0.9,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = False,
    description: str = "probe",
) -> ProbeFit:
    """Train the len(learning_rates) x len(weight_decays) grid at once and report the best head's
    test top-1; deterministic under `seed` (validation split, batch order).

    Args:
        train: Training-split features (a validation share is carved from them).
        test: Test-split features.
        num_classes: K, the classes.
        learning_rates: The grid's learning rates.
        weight_decays: The grid's weight decays.
        epochs: Passes over the fitting features.
        batch_size: Samples per SGD step.
        momentum: SGD momentum.
        val_fraction: The share of `train` held out to pick the best head.
        seed: Seeds the validation split and the batch order.
        progress: Show a progress bar over the epochs.
        description: The progress bar's label.

    Returns:
        The best head's test and validation top-1, its learning rate and weight decay, and every
        head's validation top-1.

    Raises:
        ValueError: Unlabelled data, labels past `num_classes`, or `epochs` or `batch_size` < 1.
    """
    check_labels(train.labels, num_classes, "the training split")
    check_labels(test.labels, num_classes, "the test split")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs={epochs} and batch_size={batch_size} must be >= 1")
    fit, val, tested = standardized_splits(train, test, val_fraction, seed)
    grid = [(lr, wd) for lr in learning_rates for wd in weight_decays]
    heads = HeadGrid(len(grid), fit.x.shape[-1], num_classes, attentive=fit.valid is not None)
    total_steps = epochs * math.ceil(len(fit.labels) / batch_size)
    schedule = SGDSchedule.of_grid(grid, momentum, total_steps)
    train_heads(heads, fit, schedule, shown_epochs(epochs, progress, description), batch_size, seed)
    val_top1 = heads.accuracy(val.x, val.valid, val.labels)
    best = int(torch.argmax(val_top1))  # the first of equals: deterministic
    test_top1 = heads.accuracy(tested.x, tested.valid, tested.labels)
    lr, wd = grid[best]
    return ProbeFit(
        top1=float(test_top1[best]),
        val_top1=float(val_top1[best]),
        learning_rate=lr,
        weight_decay=wd,
        head_val_top1=[float(v) for v in val_top1],
    )


def standardized_splits(
    train: Features, test: Features, val_fraction: float, seed: int
) -> tuple[Features, Features, Features]:
    """The fitting share of `train`, its validation share and `test`, standardised with the
    fitting share's statistics (padding tokens stay zero).

    Args:
        train: Training-split features.
        test: Test-split features.
        val_fraction: The share of `train` held out for validation.
        seed: Seeds the validation split.

    Returns:
        (fit, validation, test) features, float.
    """
    fit_index, val_index = validation_split(len(train.labels), val_fraction, seed)
    fitting = Features(
        train.x[fit_index],
        train.labels[fit_index],
        None if train.valid is None else train.valid[fit_index],
    )
    standardize = Standardizer(fitting)

    def prepared(features: Features, index: Tensor | None = None) -> Features:
        x, valid, labels = features.x, features.valid, features.labels
        if index is not None:
            x, labels = x[index], labels[index]
            valid = None if valid is None else valid[index]
        x = standardize(x.float())
        if valid is not None:
            x = x * valid[..., None]  # padding stays zero
        return Features(x, labels, valid)

    return prepared(train, fit_index), prepared(train, val_index), prepared(test)


@dataclass(kw_only=True)
class SGDSchedule:
    """The heads' SGD: per-head rates decayed on a cosine over all steps, momentum, and weight
    decay on the linear weights only.

    Attributes:
        learning_rates: [H] every head's peak rate.
        weight_decays: [H] every head's weight decay.
        momentum: SGD momentum.
        total_steps: The steps of the whole fit (the cosine's length).
    """

    learning_rates: Tensor
    weight_decays: Tensor
    momentum: float
    total_steps: int

    @classmethod
    def of_grid(
        cls,
        grid: list[tuple[float, float]],
        momentum: float,
        total_steps: int,
    ) -> SGDSchedule:
        """The schedule of a grid of (learning rate, weight decay) heads.

        Args:
            grid: Every head's (learning rate, weight decay).
            momentum: SGD momentum.
            total_steps: The steps of the whole fit.

        Returns:
            The schedule.
        """
        return cls(
            learning_rates=torch.tensor([lr for lr, _ in grid]),  # [H]
            weight_decays=torch.tensor([wd for _, wd in grid]),
            momentum=momentum,
            total_steps=total_steps,
        )

    def rates(self, step: int) -> Tensor:
        """Every head's rate at one step of the cosine.

        Args:
            step: The optimizer step, from 0.

        Returns:
            [H] the rates.
        """
        return self.learning_rates * 0.5 * (1 + math.cos(math.pi * step / self.total_steps))


def shown_epochs(epochs: int, progress: bool, description: str) -> Iterable[int]:
    """range(epochs), under a progress bar when asked (none in log files: tqdm's disable=None).

    Args:
        epochs: The epochs.
        progress: Show a bar.
        description: The bar's label.

    Returns:
        The epochs to iterate.
    """
    if not progress:
        return range(epochs)
    from tqdm.auto import tqdm

    return tqdm(range(epochs), desc=description, unit="epoch", leave=False, disable=None)


def train_heads(
    heads: HeadGrid,
    fit: Features,
    schedule: SGDSchedule,
    epoch_range: Iterable[int],
    batch_size: int,
    seed: int,
) -> None:
    """Train every head at once with its own rate and decay, the batch order seeded.

    Args:
        heads: The grid, trained in place.
        fit: Standardised fitting features.
        schedule: The rates, decays and momentum.
        epoch_range: The epochs (a progress bar may wrap them).
        batch_size: Samples per step.
        seed: Seeds the batch order.
    """
    buffers = [torch.zeros_like(p) for p in heads.params]
    generator = torch.Generator().manual_seed(seed + 1)
    count, step = len(fit.labels), 0
    for _ in epoch_range:
        order = torch.randperm(count, generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            valid = None if fit.valid is None else fit.valid[index]
            logits = heads.logits(fit.x[index], valid)  # [H, B, K]
            # each head's mean cross-entropy; summed, so every head gets exactly its own gradient
            targets = fit.labels[index].repeat(len(logits))
            flat = rearrange(logits, "h b k -> (h b) k")
            loss = F.cross_entropy(flat, targets, reduction="sum") / len(index)
            grads = torch.autograd.grad(loss, heads.params)
            scale = schedule.rates(step)  # [H] cosine-decayed rates
            with torch.no_grad():
                for param, grad, buffer in zip(heads.params, grads, buffers):
                    if param is heads.weight:
                        grad = grad + schedule.weight_decays[:, None, None] * param
                    buffer.mul_(schedule.momentum).add_(grad)
                    param.sub_(scale.view(-1, *[1] * (param.dim() - 1)) * buffer)
            step += 1
