"""Per-token levels reduced to each sample's distinct levels: exact round trip, and the
released interface's per-token forward running its modulation MLPs on those few levels with
unchanged outputs."""

import torch

from selfflow.interop.official import load_official
from selfflow.models.distinct_levels import distinct_levels
from tests.helpers.released import GRID, HEADS, inputs, reference_forward, released_state_dict


def levels_with_one_two_and_many_distinct() -> torch.Tensor:
    """[3, GRID^2]: one level, two levels (a Self-Flow training sample), and every token its
    own level."""
    g = torch.Generator().manual_seed(4)
    n = GRID * GRID
    two = torch.where(torch.rand(n, generator=g) < 0.25, 0.9, 0.2)
    return torch.stack([torch.full((n,), 0.5), two, torch.rand(n, generator=g)])


def test_distinct_levels_round_trip_exactly_and_table_holds_only_levels_of_the_row():
    t = levels_with_one_two_and_many_distinct()
    levels, index = distinct_levels(t)
    assert levels.shape == (3, GRID * GRID) and index.dtype == torch.long
    assert torch.equal(torch.gather(levels, 1, index), t)
    for row, table in zip(t, levels):
        assert set(table.tolist()) == set(row.unique().tolist())
    assert distinct_levels(t[:2])[0].shape == (2, 2)  # L is the largest distinct count, not N


def test_per_token_forward_runs_adaln_on_distinct_levels_with_the_released_outputs():
    state = released_state_dict(seed=3)
    model = load_official(state, heads=HEADS)
    x, _, y = inputs()
    t = levels_with_one_two_and_many_distinct()
    seen = []
    model.model.blocks[0].adaLN_modulation.register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape)
    )
    with torch.no_grad():
        ours, reference = model(x[:2], t[:2], y[:2]), reference_forward(state, x[:2], t[:2], y[:2])
        torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(
            model(x, t, y), reference_forward(state, x, t, y), atol=2e-5, rtol=1e-5
        )
    assert seen[0] == (
        2,
        2,
        model.model.width,
    )  # two distinct levels per sample, not one vector per token
