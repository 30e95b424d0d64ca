"""The core types every stage shares: token batches of one modality (`Tokens`) or packed across
modalities (`PackedTokens`), encoded captions (`TextTokens`), and the `Condition` that carries what
a sample is generated from besides its noise level (class labels, text, size conditioning).

Plain PyTorch and dataclasses, imported by every layer (data, tokenizers, models, objectives,
sampling, training) and importing none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

POSITION_AXES = ("t", "h", "w", "l")
# the modality name of caption tokens: they condition the model, they are never generated
TEXT = "text"
NO_LABEL = -1  # a label that conditions on nothing: the model embeds its null class for it


@dataclass
class Tokens:
    """A batch of token sequences of one modality.

    Attributes:
        x: [B, N, C] token features.
        pos: [B, N, 4] long position ids over (t, h, w, l).
        modality: The modality's name (`image`, `video`, `audio`).
        valid: [B, N] bool, False on padding; None when every token is valid.
    """

    x: Tensor  # [B, N, C] token features
    pos: Tensor  # [B, N, 4] long position ids over (t, h, w, l)
    modality: str
    valid: Tensor | None = None  # [B, N] bool, False on padding; None = all valid

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    @property
    def modalities(self) -> TokenModalities:
        """Which modality each token is: `modality`, every token of the batch."""
        return TokenModalities(single=self.modality, masks={self.modality: self.valid})

    @property
    def segment(self) -> Tensor:
        """[B, N] long sample of each token in its row: 0, or -1 on padding (one sample a row)."""
        return as_segments(self)

    @property
    def num_segments(self) -> int:
        """S, the sample slots per row: one."""
        return 1

    @property
    def sample_modalities(self) -> list[list[str]]:
        """Row -> the modality of each of its samples: one sample a row."""
        return [[self.modality]] * self.batch_size

    @property
    def channel_counts(self) -> None:
        """Every token has all C channels (one modality): None, as in `PackedTokens`."""
        return None


@dataclass(frozen=True)
class TokenModalities:
    """Which modality each token of a batch is: the one answer that the model's input projections
    and output heads, the objective's mask ratios, loss weights and channels, and the per-modality
    logs share. A batch of one modality names it once; packed rows carry a mask per modality.

    Attributes:
        single: The modality of every token (padding included) of a one-modality batch; None for
            packed rows.
        masks: Modality -> [B, N] bool, True on its tokens, padding excluded; None in place of a
            mask where that modality has every token of the batch (a one-modality batch without
            padding).
    """

    single: str | None
    masks: dict[str, Tensor | None]

    def per_token(self, value: Callable[[str], Tensor | float]) -> Tensor | float:
        """Each token's value of its own modality (zero on the padding of packed rows).

        Args:
            value: Modality -> its value: a number, or a [B, N, ...] tensor of which each token
                takes its own row.

        Returns:
            `value(single)` for a one-modality batch; else [B, N, ...] with each token's value.
        """
        if self.single is not None:
            return value(self.single)
        total = 0
        for name, sel in self.masks.items():
            own = value(name)
            total = total + torch.where(_widened(sel, own), own, 0)
        return total


def _widened(sel: Tensor, value: Tensor | float) -> Tensor:
    """[B, N] bool with trailing axes to broadcast against `value`."""
    extra = value.dim() - sel.dim() if isinstance(value, Tensor) else 0
    return sel.view(*sel.shape, *[1] * extra)


@dataclass(kw_only=True)
class PackedTokens:
    """Samples of possibly different modalities and lengths packed into R rows of N tokens.

    Token n of row r belongs to sample `segment[r, n]` of that row (-1 on padding). Channels differ
    per modality: `x` holds each token's own channels first and zeros after them.

    Attributes:
        x: [R, N, C_max] token features, each token's own channels first and zeros after them.
        pos: [R, N, 4] long position ids over (t, h, w, l).
        segment: [R, N] long, the sample of its row each token belongs to; -1 on padding.
        modality_masks: Modality -> [R, N] bool, True on that modality's tokens.
        segment_labels: [R, S] long class labels per sample slot (the null label on empty slots).
        segment_modality: Row -> the modality of each of its samples.
        channels: Modality -> its token channels.
        order: Row -> indices of its samples in the packed input.
    """

    x: Tensor  # [R, N, C_max]
    pos: Tensor  # [R, N, 4]
    segment: Tensor  # [R, N] long, -1 on padding
    modality_masks: dict[str, Tensor]  # modality -> [R, N] bool
    segment_labels: Tensor  # [R, S] long (the null label on empty segment slots)
    segment_modality: list[list[str]]  # row -> the modality of each of its samples
    channels: dict[str, int]  # modality -> its token channels
    # row -> indices of its samples in the packed input
    order: list[list[int]] = field(default_factory=list)

    @property
    def valid(self) -> Tensor:
        return self.segment >= 0

    @property
    def num_segments(self) -> int:
        return self.segment_labels.shape[1]

    @property
    def batch_size(self) -> int:
        """Samples in all rows (not rows)."""
        return sum(len(row) for row in self.segment_modality)

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum())

    @property
    def modalities(self) -> TokenModalities:
        """Which modality each token is: a mask per modality."""
        return TokenModalities(single=None, masks=self.modality_masks)

    @property
    def sample_modalities(self) -> list[list[str]]:
        """Row -> the modality of each of its samples."""
        return self.segment_modality

    @property
    def channel_counts(self) -> Tensor:
        """[R, N] long channels of each token's own modality (0 on padding)."""
        return self.modalities.per_token(lambda name: self.channels[name])


def as_segments(tokens: Tokens) -> Tensor:
    """[B, N] segment ids of an unpacked batch: every row is one sample (0), padding is -1.

    Args:
        tokens: The unpacked batch.

    Returns:
        [B, N] long: 0 on valid tokens, -1 on padding.
    """
    if tokens.valid is None:
        return torch.zeros(tokens.x.shape[:2], dtype=torch.long, device=tokens.x.device)
    return torch.where(tokens.valid, 0, -1)


@dataclass
class TextTokens:
    """A batch of encoded captions; rows with no valid token (and a zero pooled vector) are the null
    text.

    Attributes:
        x: [B, T, C] features of the frozen text encoder.
        valid: [B, T] bool, False on padding.
        pooled: [B, C] one vector per caption.
    """

    x: Tensor  # [B, T, C] frozen encoder features
    valid: Tensor  # [B, T] bool, False on padding
    pooled: Tensor  # [B, C] one vector per caption

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def pos(self) -> Tensor:
        """[B, T, 4] position ids (0, 0, 0, l)."""
        b, t = self.valid.shape
        pos = torch.zeros(b, t, 4, dtype=torch.long, device=self.x.device)
        pos[..., 3] = torch.arange(t, device=self.x.device)
        return pos

    def drop(self, rows: Tensor) -> TextTokens:
        """The same batch with some rows replaced by the null text (classifier-free guidance).

        Args:
            rows: [B] bool, True on the rows to drop.

        Returns:
            The batch with those rows' features, validity and pooled vectors zeroed.
        """
        keep = ~rows.to(self.valid.device)
        return TextTokens(
            self.x * keep[:, None, None].to(self.x.dtype),
            self.valid & keep[:, None],
            self.pooled * keep[:, None].to(self.pooled.dtype),
        )

    def null(self) -> TextTokens:
        """Every row replaced by the null text.

        Returns:
            A batch of the same shape with no valid token.
        """
        return self.drop(torch.ones(self.batch_size, dtype=torch.bool, device=self.valid.device))

    def repeat(self, times: int) -> TextTokens:
        """The batch stacked `times` times along the batch axis.

        Args:
            times: How many copies.

        Returns:
            [times * B, ...] captions.
        """
        return TextTokens(
            self.x.repeat(times, 1, 1),
            self.valid.repeat(times, 1),
            self.pooled.repeat(times, 1),
        )

    def select(self, rows) -> TextTokens:
        """Some rows of the batch.

        Args:
            rows (slice | Tensor): Any index of the batch axis (slice, indices or [B] bool mask).

        Returns:
            The captions of those rows.
        """
        return TextTokens(self.x[rows], self.valid[rows], self.pooled[rows])

    def to(self, device) -> TextTokens:
        """The batch on another device.

        Args:
            device (torch.device | str): Where the tensors go.

        Returns:
            The same captions on `device`.
        """
        return TextTokens(self.x.to(device), self.valid.to(device), self.pooled.to(device))

    @staticmethod
    def cat(batches: list[TextTokens]) -> TextTokens:
        """Batches of captions one after another.

        Args:
            batches: Caption batches of equal length T and channels C.

        Returns:
            One batch with the rows of all of them.
        """
        return TextTokens(
            *(torch.cat([getattr(b, name) for b in batches]) for name in ("x", "valid", "pooled")),
        )


@dataclass
class Condition:
    """What a batch is conditioned on besides its noise level: one field per signal, None where
    absent.

    labels: [B] class ids, or [B, S] one per sample of a packed row; NO_LABEL (-1) conditions on
    nothing (the model embeds its null class). text: the batch's encoded captions. sizes: [B, 6]
    size and crop conditioning of multi-aspect models, a property of the sample that guidance never
    drops.

    `drop(rows)` replaces the droppable signals of some rows by their null (classifier-free guidance
    and its training dropout), `null()` does it for every row, `repeat(k)` stacks the batch k times.
    A new conditioning signal is one new field here (listed in DROPPABLE if guidance drops it) and
    its use in the model.

    Attributes:
        labels: [B] class ids, or [B, S] one per sample of a packed row; NO_LABEL (-1) is no class.
        text: The batch's encoded captions.
        sizes: [B, 6] size and crop conditioning of multi-aspect models.
    """

    labels: Tensor | None = None
    text: TextTokens | None = None
    sizes: Tensor | None = None

    DROPPABLE = ("labels", "text")

    @property
    def batch_size(self) -> int | None:
        present = [v for v in (self.labels, self.text, self.sizes) if v is not None]
        if not present:
            return None
        first = present[0]
        return first.batch_size if isinstance(first, TextTokens) else first.shape[0]

    def drop(self, rows: Tensor, only: str | None = None) -> Condition:
        """Some rows' droppable signals replaced by their null (guidance and its training dropout).

        Args:
            rows: bool, [B] (or [B, S] for per-sample labels), True where the signals are dropped.
            only: One field of DROPPABLE to drop, keeping the others; None drops them all.

        Returns:
            The condition with those rows' labels set to NO_LABEL and their text to the null text.

        Raises:
            ValueError: `only` names a field that is not in DROPPABLE.
        """
        names = self.DROPPABLE if only is None else (only,)
        if only is not None and only not in self.DROPPABLE:
            raise ValueError(
                f"Condition.drop(only={only!r}): droppable signals are {self.DROPPABLE}",
            )
        changes = {}
        if "labels" in names and self.labels is not None:
            rows_here = rows.to(self.labels.device)
            if rows_here.dim() < self.labels.dim():
                rows_here = rows_here[:, None]
            changes["labels"] = torch.where(
                rows_here,
                torch.full_like(self.labels, NO_LABEL),
                self.labels,
            )
        if "text" in names and self.text is not None:
            changes["text"] = self.text.drop(rows if rows.dim() == 1 else rows.any(dim=1))
        return replace(self, **changes)

    def null(self) -> Condition:
        """Every row conditioned on nothing droppable (the unconditional half of guidance).

        Returns:
            The condition with every row's droppable signals dropped (sizes kept).
        """
        size = self.batch_size
        if size is None:
            return self
        device = next(
            v.valid.device if isinstance(v, TextTokens) else v.device
            for v in (self.labels, self.text, self.sizes)
            if v is not None
        )
        return self.drop(torch.ones(size, dtype=torch.bool, device=device))

    def map(self, tensor_fn, text_fn) -> Condition:
        """Each present field through `tensor_fn` (tensors) or `text_fn` (TextTokens).

        Args:
            tensor_fn (Callable[[Tensor], Tensor]): Applied to each tensor field (labels, sizes).
            text_fn (Callable[[TextTokens], TextTokens]): Applied to the captions.

        Returns:
            A new condition of the results; absent fields stay None.
        """

        def apply(value):
            if value is None:
                return None
            return text_fn(value) if isinstance(value, TextTokens) else tensor_fn(value)

        return Condition(*(apply(getattr(self, f.name)) for f in fields(self)))

    def repeat(self, times: int) -> Condition:
        """The batch stacked `times` times along the batch axis.

        Args:
            times: How many copies.

        Returns:
            A condition of batch size `times * B`.
        """
        return self.map(
            lambda t: t.repeat(times, *([1] * (t.dim() - 1))),
            lambda t: t.repeat(times),
        )

    def select(self, rows) -> Condition:
        """Some rows of the batch.

        Args:
            rows (slice | Tensor): Any index of the batch axis (slice, indices or [B] bool mask).

        Returns:
            The condition of those rows.
        """
        return self.map(lambda t: t[rows], lambda t: t.select(rows))

    def to(self, device) -> Condition:
        """The condition on another device.

        Args:
            device (torch.device | str): Where the tensors go.

        Returns:
            The same condition on `device`.
        """
        return self.map(lambda t: t.to(device), lambda t: t.to(device))

    @staticmethod
    def cat(conditions: list[Condition]) -> Condition:
        """The batches one after another (every condition must have the same fields present).

        Args:
            conditions: Conditions with the same fields present.

        Returns:
            One condition with the rows of all of them.

        Raises:
            ValueError: A field is present in some conditions only.
        """
        first = conditions[0]
        out = {}
        for f in fields(first):
            values = [getattr(c, f.name) for c in conditions]
            if all(v is None for v in values):
                out[f.name] = None
            elif any(v is None for v in values):
                raise ValueError(f"Condition.cat: {f.name} is present in some conditions only")
            else:
                is_text = isinstance(values[0], TextTokens)
                out[f.name] = TextTokens.cat(values) if is_text else torch.cat(values)
        return Condition(**out)
