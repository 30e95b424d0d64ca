import pytest
import torch

from selfflow.flow.dual_timestep import DualTimestepScheduler


def test_exact_mask_count_per_sample():
    scheduler = DualTimestepScheduler(mask_ratio=0.25)
    levels = scheduler(64, 40)
    assert levels.mask.shape == (64, 40)
    assert torch.all(levels.mask.sum(dim=1) == 10)


def test_exact_count_ignores_padding_tokens():
    valid = torch.ones(3, 8, dtype=torch.bool)
    valid[1, 4:] = False  # 4 valid tokens
    valid[2, 2:] = False  # 2 valid tokens
    levels = DualTimestepScheduler(mask_ratio=0.5)(3, 8, valid=valid)
    assert levels.mask.sum(dim=1).tolist() == [4, 2, 1]
    assert not torch.any(levels.mask & ~valid)


def test_bernoulli_mask_has_the_ratio_on_average():
    torch.manual_seed(0)
    levels = DualTimestepScheduler(mask_ratio=0.3, mask_mode="bernoulli")(400, 100)
    counts = levels.mask.sum(dim=1).float()
    assert abs(counts.mean().item() - 30) < 1.0
    assert counts.std() > 1  # counts vary per sample, unlike the exact mode


def test_ratio_above_half_is_rejected_with_the_key_named():
    with pytest.raises(ValueError, match=r"objective.mask_ratio=0.6.*\[0, 0.5\]"):
        DualTimestepScheduler(mask_ratio=0.6)
    with pytest.raises(ValueError, match="mask_mode"):
        DualTimestepScheduler(mask_ratio=0.2, mask_mode="sorted")


def test_tokens_take_their_group_level_and_teacher_is_never_noisier():
    torch.manual_seed(1)
    levels = DualTimestepScheduler(mask_ratio=0.25)(128, 32)
    per_token = levels.per_token
    t, s = levels.levels[:, 0:1], levels.levels[:, 1:2]
    assert torch.equal(per_token, torch.where(levels.mask, s.expand(-1, 32), t.expand(-1, 32)))
    # the invariant of the method: on every token the teacher's level is <= the student's
    assert torch.all(levels.teacher_levels <= per_token)
    assert torch.all(levels.teacher_per_token <= per_token)
    assert torch.equal(levels.teacher_levels, torch.minimum(t, s))


def test_levels_are_not_sorted():
    torch.manual_seed(2)
    levels = DualTimestepScheduler(mask_ratio=0.25)(2000, 16)
    t, s = levels.levels[:, 0], levels.levels[:, 1]
    masked_noisier = (s > t).float().mean().item()
    # with iid unsorted draws the masked group is the noisier one about half of the time
    assert 0.45 < masked_noisier < 0.55


def test_zero_ratio_is_vanilla_one_level_per_sample():
    levels = DualTimestepScheduler(mask_ratio=0.0)(16, 10)
    assert not levels.mask.any()
    assert torch.equal(levels.per_token, levels.levels[:, :1].expand(-1, 10))
    # with no masked token the teacher sees the student's own level, not the unused s
    assert torch.equal(levels.teacher_levels[:, 0], levels.levels[:, 0])


def test_packed_rows_get_levels_and_exact_counts_per_sample():
    torch.manual_seed(3)
    segment = torch.tensor(
        [[0] * 8 + [1] * 4 + [2] * 2 + [-1] * 2, [0] * 12 + [1] * 4]
    )  # [R=2, N=16]
    ratios = torch.tensor([[0.25, 0.5, 0.5], [0.5, 0.25, 0.0]])
    levels = DualTimestepScheduler(mask_ratio=0.25).for_segments(segment, 3, ratios)
    counts = [[int((levels.mask[r] & (segment[r] == k)).sum()) for k in range(3)] for r in range(2)]
    assert counts == [[2, 2, 1], [6, 1, 0]]
    assert not levels.mask[0, 14:].any()  # padding is never masked
    per_token = levels.per_token
    for r in range(2):
        for k in range(3):
            tokens = segment[r] == k
            if not tokens.any():
                continue
            t, s = levels.levels[r, 2 * k], levels.levels[r, 2 * k + 1]
            expected = torch.where(levels.mask[r][tokens], s, t)
            assert torch.equal(per_token[r][tokens], expected)
            assert torch.all(levels.teacher_per_token[r][tokens] <= per_token[r][tokens])
    # a sample with no masked token: its teacher level is its own t
    assert levels.teacher_levels[1, 2] == levels.levels[1, 4]


def test_bernoulli_sample_with_no_masked_token_still_gives_its_teacher_min_t_s():
    """DESIGN.md: the teacher sees every token at min(t, s); a Bernoulli draw that masks no token of
    a sample does not change that (606 of 4,000 samples of 4 tokens drew none and got t before)."""
    torch.manual_seed(4)
    levels = DualTimestepScheduler(mask_ratio=0.25, mask_mode="bernoulli")(4000, 4)
    t, s = levels.levels[:, 0], levels.levels[:, 1]
    unmasked = ~levels.mask.any(dim=1)
    assert unmasked.sum() > 100  # about 0.75^4 of the samples draw no masked token
    assert torch.equal(levels.teacher_levels[:, 0], torch.minimum(t, s))
    assert torch.all(levels.teacher_per_token <= levels.per_token)
