import math

import pytest
import torch

from selfflow.flow.path import clean_estimate, interpolate, sample_path, velocity_target
from selfflow.flow.solvers import euler, time_grid
from selfflow.flow.timesteps import LogitNormal, Uniform, resolution_shift, shift_levels


def test_path_endpoints_are_data_and_noise():
    x0, x1 = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    assert torch.equal(interpolate(x0, x1, torch.zeros(2)), x0)
    assert torch.equal(interpolate(x0, x1, torch.ones(2, 5)), x1)
    mid = interpolate(x0, x1, torch.full((2, 5), 0.25))
    torch.testing.assert_close(mid, 0.75 * x0 + 0.25 * x1)


def test_velocity_target_and_clean_estimate_invert_the_path():
    x0, x1 = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    t = torch.rand(3, 4)
    sample = sample_path(x0, x1, t)
    torch.testing.assert_close(sample.target, x1 - x0)
    torch.testing.assert_close(clean_estimate(sample.x_t, velocity_target(x0, x1), t), x0)


def test_uniform_and_logit_normal_stay_in_unit_interval_with_expected_means():
    g = torch.Generator().manual_seed(0)
    u = Uniform().sample(20000, g)
    assert u.min() >= 0 and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01
    ln = LogitNormal(mean=1.0, std=0.5).sample(20000, g)
    assert ln.min() > 0 and ln.max() < 1
    assert abs(torch.logit(ln).mean() - 1.0) < 0.02 and abs(torch.logit(ln).std() - 0.5) < 0.02
    with pytest.raises(ValueError, match="std"):
        LogitNormal(std=0)


def test_shift_moves_levels_toward_noise_and_keeps_endpoints():
    t = torch.linspace(0, 1, 11)
    shifted = shift_levels(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert torch.all(shifted[1:-1] > t[1:-1])
    assert torch.all(shifted[1:] > shifted[:-1])  # still monotone
    torch.testing.assert_close(shift_levels(torch.tensor([0.5]), 3.0), torch.tensor([0.75]))
    assert resolution_shift(1024, base_tokens=256) == pytest.approx(2.0)
    assert Uniform(shift=3.0).sample(5000, torch.Generator().manual_seed(0)).mean() > 0.6


def test_time_grid_runs_from_noise_to_data():
    grid = time_grid(4)
    assert grid.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError):
        time_grid(0)


def test_euler_integrates_a_linear_flow_exactly():
    # a straight path x_t = (1 - t) a + t x1 has constant velocity x1 - a: Euler is exact at any
    # step count
    a = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    x1 = torch.tensor([[0.3, 0.7]], dtype=torch.float64)
    x0 = euler(lambda x, t: x1 - a, x1, steps=3)
    torch.testing.assert_close(x0, a)


def test_euler_converges_on_a_curved_flow_with_known_answer():
    # dx/dt = x  ->  x(0) = x(1) * exp(-1)
    x1 = torch.tensor([[1.5, -2.0]], dtype=torch.float64)
    exact = x1 * math.exp(-1)
    errors = [
        (euler(lambda x, t: x, x1, steps=n) - exact).abs().max().item() for n in (10, 100, 1000)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3
