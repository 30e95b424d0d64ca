"""The one conditioning object: Condition drops, nulls, repeats, selects and concatenates every
signal it holds the same way, so that guidance, dropout and batching need no per-signal code."""

import pytest
import torch

from selfflow.tokens import NO_LABEL, Condition, PackedTokens, TextTokens, Tokens


def captions(batch: int = 3, length: int = 4, channels: int = 5) -> TextTokens:
    numbers = torch.arange(batch * length * channels, dtype=torch.float32)
    x = numbers.reshape(batch, length, channels) + 1
    valid = torch.ones(batch, length, dtype=torch.bool)
    return TextTokens(x, valid, x.mean(dim=1))


def full_condition() -> Condition:
    return Condition(
        labels=torch.tensor([3, 1, 4]),
        text=captions(),
        sizes=torch.arange(18.0).reshape(3, 6),
    )


def test_drop_nulls_the_droppable_signals_of_the_chosen_rows_and_keeps_sizes():
    condition = full_condition()
    dropped = condition.drop(torch.tensor([False, True, False]))
    assert dropped.labels.tolist() == [3, NO_LABEL, 4]
    assert dropped.text.valid.tolist() == [[True] * 4, [False] * 4, [True] * 4]
    assert dropped.text.x[1].abs().sum() == 0 and dropped.text.pooled[1].abs().sum() == 0
    assert torch.equal(dropped.text.x[[0, 2]], condition.text.x[[0, 2]])
    assert torch.equal(
        dropped.sizes,
        condition.sizes,
    )  # a property of the sample: guidance never drops it
    assert condition.labels.tolist() == [3, 1, 4]  # the original is unchanged


def test_drop_only_one_signal_and_per_sample_labels_of_packed_rows():
    condition = full_condition()
    labels_only = condition.drop(torch.tensor([True, False, False]), only="labels")
    assert labels_only.labels.tolist() == [NO_LABEL, 1, 4] and bool(labels_only.text.valid[0].all())
    with pytest.raises(ValueError, match="droppable signals are"):
        condition.drop(torch.tensor([True, False, False]), only="sizes")
    packed = Condition(labels=torch.tensor([[1, 2], [3, 4]]))  # [rows, samples of a row]
    assert packed.drop(torch.tensor([[True, False], [False, True]])).labels.tolist() == [
        [NO_LABEL, 2],
        [3, NO_LABEL],
    ]
    assert packed.drop(torch.tensor([True, False])).labels.tolist() == [
        [NO_LABEL, NO_LABEL],
        [3, 4],
    ]


def test_null_repeat_select_and_cat_treat_every_field_alike():
    condition = full_condition()
    null = condition.null()
    assert null.labels.tolist() == [NO_LABEL] * 3 and not null.text.valid.any()
    assert torch.equal(null.sizes, condition.sizes)
    assert Condition().null() == Condition() and Condition().batch_size is None

    twice = condition.repeat(2)
    assert twice.batch_size == 6 and twice.labels.tolist() == [3, 1, 4, 3, 1, 4]
    assert torch.equal(twice.text.x[3:], condition.text.x) and torch.equal(
        twice.sizes[3:],
        condition.sizes,
    )

    picked = condition.select(torch.tensor([2, 0]))
    assert picked.labels.tolist() == [4, 3] and torch.equal(picked.text.x[0], condition.text.x[2])
    assert torch.equal(picked.sizes[1], condition.sizes[0])

    both = Condition.cat([condition, null])
    assert both.labels.tolist() == [3, 1, 4, *[NO_LABEL] * 3] and both.text.batch_size == 6
    with pytest.raises(ValueError, match="text is present in some conditions only"):
        Condition.cat([condition, Condition(labels=torch.tensor([0]), sizes=torch.zeros(1, 6))])


def test_every_batch_says_which_modality_each_token_is():
    """One modality names itself once (padding included); packed rows answer with a mask per
    modality, and per-token values follow it with zeros on the padding."""
    valid = torch.tensor([[True, True, False]])
    padded = Tokens(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4, dtype=torch.long), "audio", valid)
    assert padded.modalities.single == "audio" and padded.modalities.masks["audio"] is valid
    assert padded.modalities.per_token({"audio": 2.0}.__getitem__) == 2.0
    assert padded.segment.tolist() == [[0, 0, -1]] and padded.sample_modalities == [["audio"]]
    assert padded.channel_counts is None and padded.num_segments == 1
    image = torch.tensor([[True, True, False, False]])
    audio = torch.tensor([[False, False, True, False]])  # the last token is padding
    packed = PackedTokens(
        x=torch.zeros(1, 4, 12),
        pos=torch.zeros(1, 4, 4, dtype=torch.long),
        segment=torch.tensor([[0, 0, 1, -1]]),
        modality_masks={"image": image, "audio": audio},
        segment_labels=torch.tensor([[3, 5]]),
        segment_modality=[["image", "audio"]],
        channels={"image": 12, "audio": 8},
    )
    assert packed.modalities.single is None and packed.modalities.masks["audio"] is audio
    weights = packed.modalities.per_token({"image": 1.0, "audio": 0.5}.__getitem__)
    assert weights.tolist() == [[1.0, 1.0, 0.5, 0.0]]
    assert packed.channel_counts.tolist() == [[12, 12, 8, 0]]
    rows = packed.modalities.per_token(lambda m: torch.full((1, 4, 2), float(len(m))))  # [R, N, 2]
    assert rows[0, :, 0].tolist() == [5.0, 5.0, 5.0, 0.0]
