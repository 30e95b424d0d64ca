"""Solvers against flows with a closed-form answer, in float64: Gaussian data N(m, s^2)
per dimension.

On the path x_t = (1 - t) x0 + t x1 the velocity field of Gaussian data is affine in x, and
the ODE from t = 1 to t = 0 maps the noise x1 to exactly m + s x1 (the standardised coordinate
is preserved).
"""

import math

import pytest
import torch

from selfflow.flow.solvers import (
    SOLVERS,
    euler,
    euler_maruyama,
    heun,
    score_from_velocity,
    time_grid,
)

MEAN, STD = 1.5, 0.4


def gaussian_velocity(mean=MEAN, std=STD):
    """E[x1 - x0 | x_t] for x0 ~ N(mean, std^2), x1 ~ N(0, 1)."""

    def velocity(x, t):
        t = t.reshape(-1, *([1] * (x.dim() - 1)))
        var = (1 - t) ** 2 * std**2 + t**2
        centred = x - (1 - t) * mean
        x0 = mean + (1 - t) * std**2 / var * centred
        x1 = t / var * centred
        return x1 - x0

    return velocity


def counted(velocity):
    def wrapper(x, t):
        wrapper.calls += 1
        return velocity(x, t)

    wrapper.calls = 0
    return wrapper


def noise(n=256, dim=4, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("solver, steps, atol", [(euler, 1000, 3e-3), (heun, 200, 2e-4)])
def test_ode_solvers_reach_the_analytic_endpoint(solver, steps, atol):
    x1 = noise()
    x0 = solver(gaussian_velocity(), x1, steps=steps)
    torch.testing.assert_close(x0, MEAN + STD * x1, atol=atol, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 5, 8, 25])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_calls_the_model_exactly_steps_times(name, steps):
    velocity = counted(gaussian_velocity())
    if name == "sde" and steps < 2:
        with pytest.raises(ValueError, match="steps >= 2"):
            SOLVERS[name](velocity, noise(4), steps)
        return
    SOLVERS[name](velocity, noise(4), steps)
    assert velocity.calls == steps


@pytest.mark.parametrize("nfe", [4, 8, 9, 16])
def test_heun_beats_euler_at_equal_nfe(nfe):
    x1 = noise()
    exact = MEAN + STD * x1
    error = {
        s.__name__: (s(gaussian_velocity(), x1, nfe) - exact).abs().max().item()
        for s in (euler, heun)
    }
    assert error["heun"] < 0.5 * error["euler"], error


def test_heun_is_second_order_and_euler_first_order():
    x1 = noise()
    exact = MEAN + STD * x1

    def err(solver, nfe):
        return (solver(gaussian_velocity(), x1, nfe) - exact).abs().max().item()

    euler_rate = math.log2(err(euler, 32) / err(euler, 64))
    heun_rate = math.log2(err(heun, 32) / err(heun, 64))
    assert 0.8 < euler_rate < 1.3
    assert 1.7 < heun_rate < 2.4


def test_shifted_grid_keeps_the_endpoints_and_still_converges():
    grid = time_grid(10, shift=3.0)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and torch.all(grid[1:] < grid[:-1])
    x1 = noise()
    torch.testing.assert_close(
        heun(gaussian_velocity(), x1, 100, shift=3.0), MEAN + STD * x1, atol=2e-3, rtol=0
    )


def test_score_from_velocity_matches_the_gaussian_score():
    x = noise(64, 3)
    t = torch.full((64,), 0.3, dtype=torch.float64)
    var = (1 - 0.3) ** 2 * STD**2 + 0.3**2
    expected = -(x - (1 - 0.3) * MEAN) / var
    torch.testing.assert_close(score_from_velocity(gaussian_velocity()(x, t), x, t), expected)


def test_sde_reaches_the_data_distribution():
    generator = torch.Generator().manual_seed(1)
    x1 = torch.randn(4000, 8, generator=generator, dtype=torch.float64)
    samples = euler_maruyama(
        gaussian_velocity(),
        x1,
        steps=250,
        noise=lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype),
    )
    assert abs(samples.mean().item() - MEAN) < 0.01
    assert abs(samples.std().item() - STD) < 0.01
    # it is stochastic: the samples are not the deterministic ODE map of their noise
    assert (samples - (MEAN + STD * x1)).abs().mean() > 0.05


def test_sde_without_diffusion_is_the_deterministic_ode():
    x1 = noise()
    a = euler_maruyama(
        gaussian_velocity(), x1, steps=400, diffusion_norm=0.0, noise=torch.randn_like
    )
    b = euler_maruyama(
        gaussian_velocity(), x1, steps=400, diffusion_norm=0.0, noise=torch.randn_like
    )
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # Euler with a last step of 0.04: first-order close to the exact map
    torch.testing.assert_close(a, MEAN + STD * x1, atol=2e-2, rtol=0)


@pytest.mark.parametrize("mode", ["mean", "euler"])
def test_sde_last_step_follows_the_drift_or_the_velocity_alone(mode):
    """steps=2 without noise: one step from 1 to 0.04 along v - t s, then the last step from
    0.04 to 0 along the same drift v - 0.04 s ("mean", the released sampler's) or along v
    alone ("euler")."""
    v, x1 = gaussian_velocity(), noise(8)

    def level(t):
        return torch.full((8,), t, dtype=torch.float64)

    x = x1 - 0.96 * (v(x1, level(1.0)) - score_from_velocity(v(x1, level(1.0)), x1, level(1.0)))
    drift = v(x, level(0.04))
    if mode == "mean":
        drift = drift - 0.04 * score_from_velocity(drift, x, level(0.04))
    expected = x - 0.04 * drift
    out = euler_maruyama(v, x1, steps=2, noise=torch.zeros_like, last_step_mode=mode)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_sde_rejects_bad_options():
    with pytest.raises(ValueError, match="last_step"):
        euler_maruyama(gaussian_velocity(), noise(2), steps=10, last_step=1.5)
    with pytest.raises(ValueError, match="sde_last_step_mode='tweedie'"):
        euler_maruyama(gaussian_velocity(), noise(2), steps=10, last_step_mode="tweedie")
