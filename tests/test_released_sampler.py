"""`selfflow-sample sampler=sde` against the released Self-Flow sampling loop, re-stated here from
its maths.

The released inference code samples with SiT's transport sampler: Euler-Maruyama on the linear path,
diffusion of the "sigma" form, a last "Mean" step of size 0.04, 250 steps, classifier-free guidance
inside a guidance interval. It runs in SiT's time convention (tau = 0 noise, tau = 1 data: x = tau *
data + (1 - tau) * noise, velocity u = dx/dtau = -v); the interval is compared with the noise level
1 - tau, and the model is called at that level.
"""

import pytest
import torch

from selfflow.cli.sample import sample
from selfflow.sampling import generate
from selfflow.sampling.generate import NoiseSource, sample_generators
from selfflow.sampling.job import SamplingModel
from selfflow.tokens import Condition
from tests.helpers.configs import compose_sample
from tests.helpers.models import TOKENIZER, random_model

NUM_SAMPLES, SEED = 4, 3


def released_sde_loop(velocity_at, noise, steps: int, last_step_size: float = 0.04) -> torch.Tensor:
    """The released loop in its own convention: velocity_at(x, tau) -> u; noise() -> the next
    standard normal draw.

    tau runs over `steps` points from 0 to 1 - last_step_size; each of the first steps - 1 points
    takes an Euler-Maruyama step of the SDE dx = (u + D score) dtau + sqrt(2 D) dW, with D =
    sigma(tau) = 1 - tau and the score of the linear path (tau u - x) / (1 - tau); the last point
    takes the mean of such a step ("Mean") with size last_step_size, without noise.
    """
    taus = torch.linspace(0.0, 1.0 - last_step_size, steps)  # float32, as released
    dtau = taus[1] - taus[0]

    def sde_drift(x, tau):
        u = velocity_at(x, tau)
        diffusion = 1 - tau
        return u + diffusion * (tau * u - x) / (1 - tau)

    x = noise()
    for tau in taus[:-1]:
        z = noise()
        x = x + sde_drift(x, tau) * dtau + torch.sqrt(2 * (1 - tau)) * z * torch.sqrt(dtau)
    return x + sde_drift(x, taus[-1]) * last_step_size


def released_velocity(model, labels, cfg_scale: float, guidance_low: float, guidance_high: float):
    """The released model function: called at level 1 - tau, guided (uncond + scale (cond - uncond))
    when the scale is above 1 and that level lies in [guidance_low, guidance_high], negated into
    SiT's velocity."""
    pos = TOKENIZER.positions(len(labels))
    null = torch.full_like(labels, model.null_class)

    def velocity_at(x, tau):
        level = 1 - torch.full((x.shape[0],), float(tau))
        with torch.no_grad():
            v = model.velocity(x, level, pos, Condition(labels), "image")
            if cfg_scale > 1.0 and bool(
                torch.all((guidance_low <= level) & (level <= guidance_high))
            ):
                uncond = model.velocity(x, level, pos, Condition(null), "image")
                v = uncond + cfg_scale * (v - uncond)
        return -v

    return velocity_at


def sample_as_the_cli(monkeypatch, tmp_path, *overrides):
    """selfflow-sample on a random tiny model; returns (the generated float tokens [N, 16, 16],
    config, model)."""
    model = random_model()
    monkeypatch.setattr(
        "selfflow.sampling.run_job.load_sampling_model",  # where the sample job looks it up
        lambda *args: SamplingModel(model, {"image": TOKENIZER}, None, "model"),
    )
    generated = []
    real_sample_tokens = generate.sample_tokens

    def recording(*args, **kwargs):
        out = real_sample_tokens(*args, **kwargs)
        generated.append(out.tokens)
        return out

    monkeypatch.setattr("selfflow.sampling.job.sample_tokens", recording)
    cfg = compose_sample(
        "ckpt=random",
        f"out_dir={tmp_path}",
        f"num_samples={NUM_SAMPLES}",
        "batch_size=2",
        f"seed={SEED}",
        "device=cpu",
        "precision=fp32",
        *overrides,
    )
    summary = sample(cfg)
    return torch.cat(generated), summary, model


@pytest.mark.parametrize(
    "steps, cfg_scale, interval",
    [(250, 1.0, (0.0, 1.0)), (250, 2.5, (0.1, 0.7)), (40, 3.0, (0.0, 0.5))],
)
def test_selfflow_sample_sde_reproduces_the_released_loop(
    monkeypatch, tmp_path, steps, cfg_scale, interval
):
    tokens, summary, model = sample_as_the_cli(
        monkeypatch,
        tmp_path,
        "sampler=sde",
        f"steps={steps}",
        f"cfg_scale={cfg_scale}",
        f"guidance_interval=[{interval[0]},{interval[1]}]",
    )
    assert (
        summary["nfe"] == steps
        and summary["sde_last_step"] == 0.04
        and summary["sde_last_step_mode"] == "mean"
    )
    labels = torch.tensor(summary["labels"])
    replay = NoiseSource(
        generators=sample_generators(SEED, range(NUM_SAMPLES))
    )  # the same per-sample draws
    shape = (NUM_SAMPLES, TOKENIZER.positions(1).shape[1], TOKENIZER.token_channels)
    released = released_sde_loop(
        released_velocity(model, labels, cfg_scale, *interval), lambda: replay(shape, "cpu"), steps
    )
    assert released.abs().max() > 0.5  # a real trajectory, not a vanishing one
    torch.testing.assert_close(tokens, released, rtol=1e-5, atol=1e-5)


def test_the_euler_last_step_is_kept_under_its_own_name(monkeypatch, tmp_path):
    mean, _, _ = sample_as_the_cli(monkeypatch, tmp_path / "mean", "sampler=sde", "steps=10")
    euler, summary, _ = sample_as_the_cli(
        monkeypatch, tmp_path / "euler", "sampler=sde", "steps=10", "sde_last_step_mode=euler"
    )
    assert summary["sde_last_step_mode"] == "euler"
    assert (mean - euler).abs().max() > 1e-3
