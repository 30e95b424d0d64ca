"""Generation: noise tokens -> solver over the model's velocity (with optional guidance) ->
decoded samples.

The model is anything with `velocity(x: [B, N, C], t: [B], pos: [B, N, 4], condition: Condition,
modality) -> [B, N, C]` (a `SelfFlowTransformer`, or the released checkpoint's wrapper in
`selfflow.interop`); what the samples are conditioned on (labels, text, sizes) travels as one
`Condition`, whose `null()` is guidance's unconditional half.
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
    """A well-mixed 63-bit seed for sample `index` of a run seeded with `seed`.

    Args:
        seed: The run's seed.
        index: The sample's index in the run.

    Returns:
        A non-negative seed that depends on (seed, index) only.
    """
    return int(
        np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1)
    )


def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, so that sample i's noise depends on (seed, i) only, never on
    the batch size.

    Args:
        seed: The run's seed.
        indices: The samples' indices in the run.

    Returns:
        One seeded CPU generator per index.
    """
    return [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]


class NoiseSource:
    """Standard normal draws for a batch: from one shared generator, or from one generator per
    sample (row).

    Args:
        generator: One generator for the whole batch; None (and no `generators`) uses the global CPU
            one.
        generators: One generator per row, so that a sample's noise does not depend on its batch.
    """

    def __init__(
        self,
        generator: torch.Generator | None = None,
        generators: list[torch.Generator] | None = None,
    ):
        self.generator, self.generators = generator, generators

    def __call__(self, shape: Sequence[int], device, dtype=torch.float32) -> Tensor:
        """Noise of `shape`, drawn on the generators' device and moved to `device`.

        Args:
            shape: [B, ...] the batch's shape; B equals the number of per-row generators.
            device (torch.device | str): Where the noise goes.
            dtype (torch.dtype): The noise's dtype.

        Returns:
            [B, ...] standard normal noise.

        Raises:
            ValueError: The per-row generators do not match the batch size.
        """
        if self.generators is not None:
            if len(self.generators) != shape[0]:
                raise ValueError(
                    f"{len(self.generators)} per-sample generators for a batch of {shape[0]}"
                )
            rows = [
                torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in self.generators
            ]
            return torch.stack(rows).to(device=device, dtype=dtype)
        source = "cpu" if self.generator is None else self.generator.device
        return torch.randn(tuple(shape), generator=self.generator, device=source).to(
            device=device, dtype=dtype
        )


def resolve_device(name: str) -> torch.device:
    """auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...; a CUDA device that is not there
    is refused.

    Args:
        name: The `device` key: `auto`, `cpu`, `cuda` or `cuda:N`.

    Returns:
        The device to sample on.

    Raises:
        ValueError: An unknown name, or CUDA asked for where none is available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is unknown; choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={name} but no CUDA device is available; use device=cpu or device=auto"
        )
    return device


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """bf16 on CUDA devices that support it (precision=auto), bf16 anywhere (bf16), or none (fp32).

    Args:
        device: The device the model runs on.
        precision: The `precision` key: `auto`, `bf16` or `fp32`.

    Returns:
        The autocast dtype, or None for full precision.

    Raises:
        ValueError: An unknown precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is unknown; choose one of {PRECISIONS}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    cuda = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if cuda else None


class GuidedVelocity:
    """A velocity function v(x, t) for the solvers, with classifier-free guidance inside the
    level interval.

    Inside [lo, hi] (and at scale != 1) one batched call evaluates the conditional and null-label
    inputs and returns uncond + scale (cond - uncond); outside it, or at scale 1, the model is
    called once on the conditional input only. Counts `evaluations` (the solver's NFE) and
    `model_calls` (forward passes).

    Args:
        model (nn.Module): Anything with `velocity(x, t, pos, condition, modality)` and parameters.
        pos: [B, N, 4] position ids of the generated tokens.
        condition: What the B samples are generated from; its `null()` is the unconditional half.
        modality: The generated tokens' modality.
        cfg_scale: The guidance scale; 1 is no guidance (one model call per step).
        guidance_interval: [lo, hi] the noise levels where guidance applies, 0 <= lo <= hi <= 1.
        autocast: The dtype of the model calls' autocast; None for none of its own.
        on_evaluation: Called once per velocity evaluation (progress reporting).

    Raises:
        ValueError: `guidance_interval` is not an interval within [0, 1].
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
            raise ValueError(
                f"guidance_interval=[{lo}, {hi}] must satisfy 0 <= lo <= hi <= 1 (noise levels)"
            )
        self.model, self.pos, self.condition, self.modality = model, pos, condition, modality
        self.guided_condition = Condition.cat(
            [condition, condition.null()]
        )  # conditional rows, then unconditional
        self.cfg_scale, self.interval, self.autocast = float(cfg_scale), (lo, hi), autocast
        self.on_evaluation = on_evaluation
        self.evaluations = self.model_calls = 0

    def guided_at(self, level: float) -> bool:
        """Whether a step at this noise level uses guidance.

        Args:
            level: The step's noise level.

        Returns:
            True when the scale is not 1 and the level lies inside the guidance interval.
        """
        return self.cfg_scale != 1.0 and self.interval[0] <= level <= self.interval[1]

    def _call_model(self, x: Tensor, t: Tensor, pos: Tensor, condition: Condition) -> Tensor:
        self.model_calls += 1
        # no autocast of its own at fp32, so that a caller's (FSDP mixed precision's) stays
        # in effect
        precision = (
            nullcontext()
            if self.autocast is None
            else torch.autocast(x.device.type, dtype=self.autocast)
        )
        with precision:
            return self.model.velocity(x, t, pos, condition, self.modality).to(x.dtype)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """The (guided) velocity at x, t, as the solvers call it.

        Args:
            x: [B, N, C] tokens at level t.
            t: [B] noise levels, the same for every row.

        Returns:
            [B, N, C] the velocity, uncond + scale (cond - uncond) where guided.
        """
        self.evaluations += 1
        if self.on_evaluation is not None:
            self.on_evaluation()
        if not self.guided_at(float(t[0])):
            return self._call_model(x, t, self.pos, self.condition)
        both = self._call_model(
            torch.cat([x, x]),
            torch.cat([t, t]),
            torch.cat([self.pos, self.pos]),
            self.guided_condition,
        )
        cond, uncond = both.chunk(2)
        return uncond + self.cfg_scale * (cond - uncond)


@dataclass
class Generation:
    """Generated tokens and what they cost.

    Attributes:
        tokens: [B, N, C] generated (clean) tokens, float32.
        nfe: Velocity evaluations per sample (= steps).
        model_calls: Model forward passes (a guided step is one pass over a doubled batch).
    """

    tokens: Tensor  # [B, N, C] generated (clean) tokens, float32
    nfe: int  # velocity evaluations per sample (= steps)
    model_calls: int  # model forward passes (a guided step is one pass over a doubled batch)


def model_device(model) -> torch.device:
    """The device of a model's parameters, where its inputs must go.

    Args:
        model (nn.Module): A model with at least one parameter.

    Returns:
        The device of its first parameter.
    """
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
    """Generated tokens for the B samples of `condition`, from `noise` draws.

    Args:
        model (nn.Module): Anything with `velocity(x, t, pos, condition, modality)` and parameters.
        tokenizer: Gives the generated tokens' positions, channels and modality.
        condition: What the B samples are generated from (label NO_LABEL: unconditional).
        steps: Velocity evaluations per sample (NFE).
        solver: `euler`, `heun` or `sde` (see `selfflow.flow.solvers`).
        cfg_scale: The guidance scale; 1 is no guidance.
        guidance_interval: [lo, hi] the noise levels where guidance applies.
        noise: Where the starting noise (and the SDE's noise) comes from; None for the global
            generator.
        shift: Warps the solver's levels toward noise for shift > 1.
        precision: `auto`, `bf16` or `fp32` autocast of the model calls.
        on_evaluation: Called once per velocity evaluation (progress reporting).
        **solver_options (Any): Passed on to the solver (e.g. `last_step` of the SDE).

    Returns:
        The generated tokens with their NFE and model-call counts.

    Raises:
        ValueError: An unknown solver or precision.
    """
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
    """Decoded samples of `condition`'s B rows; noise from one `generator`, or per sample
    from `generators`.

    Args:
        model (nn.Module): Anything with `velocity(x, t, pos, condition, modality)` and parameters.
        tokenizer: Gives the tokens' positions and decodes them to samples.
        condition: What the B samples are generated from.
        steps: Velocity evaluations per sample (NFE).
        solver: `euler`, `heun` or `sde`.
        cfg_scale: The guidance scale; 1 is no guidance.
        guidance_interval: [lo, hi] the noise levels where guidance applies.
        generator: One generator for the batch's noise.
        shift: Warps the solver's levels toward noise for shift > 1.
        generators: One generator per sample instead (see `sample_generators`).

    Returns:
        The decoded samples, in the layout the tokenizer's `encode` takes (images: [B, C, H, W]).
    """
    noise = NoiseSource(generator, generators)
    out = sample_tokens(
        model, tokenizer, condition, steps, solver, cfg_scale, guidance_interval, noise, shift
    )
    return tokenizer.decode(out.tokens)
