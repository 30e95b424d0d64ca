"""Generation: noise tokens -> solver over the model's velocity (with optional guidance) -> decoded samples.

The model is anything with `velocity(x: [B, N, C], t: [B], pos: [B, N, 4], condition: Condition, modality) ->
[B, N, C]` (a `SelfFlowTransformer`, or the released checkpoint's wrapper in `selfflow.interop`); what the samples
are conditioned on (labels, text, sizes) travels as one `Condition`, whose `null()` is guidance's unconditional half.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from selfflow.flow import solvers
from selfflow.tokenizers.base import Tokenizer
from selfflow.tokens import Condition

SOLVERS = solvers.SOLVERS
PRECISIONS = ("auto", "bf16", "fp32")


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample `index` of a run seeded with `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, so that sample i's noise depends on (seed, i) only, never on the batch size."""
    return [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]


class NoiseSource:
    """Standard normal draws for a batch: from one shared generator, or from one generator per sample (row)."""

    def __init__(self, generator: torch.Generator | None = None, generators: list[torch.Generator] | None = None):
        self.generator, self.generators = generator, generators

    def __call__(self, shape: Sequence[int], device, dtype=torch.float32) -> Tensor:
        if self.generators is not None:
            if len(self.generators) != shape[0]:
                raise ValueError(f"{len(self.generators)} per-sample generators for a batch of {shape[0]}")
            rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in self.generators]
            return torch.stack(rows).to(device=device, dtype=dtype)
        source = "cpu" if self.generator is None else self.generator.device
        return torch.randn(tuple(shape), generator=self.generator, device=source).to(device=device, dtype=dtype)


def resolve_device(name: str) -> torch.device:
    """auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...; a CUDA device that is not there is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is unknown; choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA device is available; use device=cpu or device=auto")
    return device


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """bf16 on CUDA devices that support it (precision=auto), bf16 anywhere (bf16), or none (fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is unknown; choose one of {PRECISIONS}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    cuda = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if cuda else None


class GuidedVelocity:
    """A velocity function v(x, t) for the solvers, with classifier-free guidance inside the level interval.

    Inside [lo, hi] (and at scale != 1) one batched call evaluates the conditional and null-label inputs and
    returns uncond + scale (cond - uncond); outside it, or at scale 1, the model is called once on the
    conditional input only. Counts `evaluations` (the solver's NFE) and `model_calls` (forward passes).
    """

    def __init__(
        self,
        model,
        pos: Tensor,
        condition: Condition,
        modality: str,
        cfg_scale: float = 1.0,
        guidance_interval: Sequence[float] = (0.0, 1.0),
        autocast: torch.dtype | None = None,
        on_evaluation: Callable[[], None] | None = None,
    ):
        lo, hi = (float(v) for v in guidance_interval)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"guidance_interval=[{lo}, {hi}] must satisfy 0 <= lo <= hi <= 1 (noise levels)")
        self.model, self.pos, self.condition, self.modality = model, pos, condition, modality
        self.guided_condition = Condition.cat([condition, condition.null()])  # conditional rows, then unconditional
        self.cfg_scale, self.interval, self.autocast = float(cfg_scale), (lo, hi), autocast
        self.on_evaluation = on_evaluation
        self.evaluations = self.model_calls = 0

    def guided_at(self, level: float) -> bool:
        return self.cfg_scale != 1.0 and self.interval[0] <= level <= self.interval[1]

    def _call_model(self, x: Tensor, t: Tensor, pos: Tensor, condition: Condition) -> Tensor:
        self.model_calls += 1
        # no autocast of its own at fp32, so that a caller's (FSDP mixed precision's) stays in effect
        precision = nullcontext() if self.autocast is None else torch.autocast(x.device.type, dtype=self.autocast)
        with precision:
            return self.model.velocity(x, t, pos, condition, self.modality).to(x.dtype)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.evaluations += 1
        if self.on_evaluation is not None:
            self.on_evaluation()
        if not self.guided_at(float(t[0])):
            return self._call_model(x, t, self.pos, self.condition)
        both = self._call_model(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.pos, self.pos]), self.guided_condition
        )
        cond, uncond = both.chunk(2)
        return uncond + self.cfg_scale * (cond - uncond)


@dataclass
class Generation:
    tokens: Tensor  # [B, N, C] generated (clean) tokens, float32
    nfe: int  # velocity evaluations per sample (= steps)
    model_calls: int  # model forward passes (a guided step is one pass over a doubled batch)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def sample_tokens(
    model,
    tokenizer: Tokenizer,
    condition: Condition,
    steps: int = 50,
    solver: str = "euler",
    cfg_scale: float = 1.0,
    guidance_interval: Sequence[float] = (0.0, 1.0),
    noise: NoiseSource | None = None,
    shift: float = 1.0,
    precision: str = "fp32",
    on_evaluation: Callable[[], None] | None = None,
    **solver_options,
) -> Generation:
    """Generated tokens for the B samples of `condition` (labels [B]: NO_LABEL for unconditional samples), from
    `noise` draws."""
    if solver not in SOLVERS:
        raise ValueError(f"sampler={solver!r} is unknown; choose one of {sorted(SOLVERS)}")
    noise = noise or NoiseSource()
    device = model_device(model)
    condition = condition.to(device)
    count = condition.batch_size
    pos = tokenizer.positions(count, device)
    x1 = noise((count, pos.shape[1], tokenizer.token_channels), device)
    velocity = GuidedVelocity(
        model,
        pos,
        condition,
        tokenizer.modality,
        cfg_scale,
        guidance_interval,
        autocast_dtype(device, precision),
        on_evaluation,
    )
    if solver in solvers.STOCHASTIC:
        solver_options["noise"] = lambda x: noise(x.shape, x.device, x.dtype)
    x0 = SOLVERS[solver](velocity, x1, steps, shift=shift, **solver_options)
    return Generation(x0.float(), velocity.evaluations, velocity.model_calls)


@torch.no_grad()
def generate(
    model,
    tokenizer: Tokenizer,
    condition: Condition,
    steps: int = 50,
    solver: str = "euler",
    cfg_scale: float = 1.0,
    guidance_interval: Sequence[float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
    shift: float = 1.0,
    generators: list[torch.Generator] | None = None,
) -> Tensor:
    """Decoded samples of `condition`'s B rows; noise from one `generator`, or per sample from `generators`."""
    noise = NoiseSource(generator, generators)
    out = sample_tokens(model, tokenizer, condition, steps, solver, cfg_scale, guidance_interval, noise, shift)
    return tokenizer.decode(out.tokens)
