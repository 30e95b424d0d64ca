"""A sampling job: N samples of a checkpoint, their conditions and noise fixed by a seed, written to a folder.

`load_sampling_model` reads a selfflow checkpoint, an export or the released checkpoint; `SamplingPlan` says what to
generate (conditions, solver, guidance, seed); `generate_batches` runs it batch by batch and `SampleWriter` writes
each batch's files as it comes (see `selfflow.sampling.modalities` for what each modality writes). Sample `i`'s
noise depends on (seed, i) only, so the same seed gives the same samples for any batch size.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selfflow.interop.official import OFFICIAL_PREFIX
from selfflow.sampling import writers
from selfflow.sampling.generate import Generation, NoiseSource, sample_generators, sample_tokens
from selfflow.sampling.modalities import modality_io
from selfflow.sampling.prompted import prompt_text
from selfflow.sampling.refine import refine_tokens
from selfflow.tokenizers.base import Tokenizer
from selfflow.tokens import NO_LABEL, Condition

DEFAULT_SOLVERS = {"model": ("euler", 50), "official": ("sde", 250)}  # sampler and steps when left unset


@dataclass
class SamplingModel:
    model: Any  # velocity(x, t, pos, condition, modality), num_classes, null_class
    tokenizers: dict[str, Tokenizer]
    data_config: Any  # the run's data config (the metrics' real split), None for the released model
    kind: str  # "model" or "official"


def load_sampling_model(ckpt: str, weights: str = "ema", vae: str | None = None) -> SamplingModel:
    """A selfflow checkpoint or export, or `official:PATH` for the released Self-Flow checkpoint (with `vae`)."""
    if ckpt.startswith(OFFICIAL_PREFIX):
        from selfflow.interop.official import load_official_for_sampling

        model, tokenizers = load_official_for_sampling(ckpt[len(OFFICIAL_PREFIX):], vae)
        return SamplingModel(model, tokenizers, None, "official")
    from selfflow.interop.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt, weights=weights, vae=vae)
    return SamplingModel(loaded.model, loaded.tokenizers, loaded.config.get("data"), "model")


def pick_modality(requested: str | None, tokenizers: dict[str, Any]) -> str:
    if requested is None:
        return next(iter(tokenizers))
    if requested not in tokenizers:
        raise ValueError(f"modality={requested} is not in this checkpoint; it has {sorted(tokenizers)}")
    return requested


def resolve_labels(labels, num_samples: int, num_classes: int, null_class: int) -> Tensor:
    """Given class ids cycled to num_samples, or all classes round-robin, or the null label if unconditional."""
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    if labels is None:
        if num_classes == 0:
            return torch.full((num_samples,), null_class, dtype=torch.long)
        return torch.arange(num_samples) % num_classes
    labels = [int(v) for v in (labels if isinstance(labels, Sequence) and not isinstance(labels, str) else [labels])]
    bad = [v for v in labels if not (0 <= v < num_classes or v == null_class)]
    if not labels or bad:
        raise ValueError(f"labels={labels} must be class ids in 0..{num_classes - 1} (or {null_class}, the null "
                         f"label); leave labels=null for all classes round-robin")
    return torch.tensor(labels, dtype=torch.long).repeat(math.ceil(num_samples / len(labels)))[:num_samples]


def size_rows(model, tokenizer, count: int) -> Tensor | None:
    """[count, 6] size conditioning of a multi-aspect model: an uncropped image of the size generated (None for a
    model without size conditioning)."""
    if getattr(model, "size_embedder", None) is None:
        return None
    height, width = tokenizer.image_size
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(count, 1)


def sampling_condition(model, tokenizer, tokenizers: dict[str, Tokenizer], labels, num_samples: int,
                       prompt=None) -> Condition:
    """The N samples' condition: class labels (given ids cycled, else every class round-robin), the prompt for a
    text model (its label then conditions on nothing unless labels are given), size conditioning for a multi-aspect
    model."""
    text = prompt_text(tokenizers, prompt, num_samples)
    ids = resolve_labels(labels, num_samples, model.num_classes, model.null_class)
    if text is not None and labels is None:  # text models: the caption is the condition
        ids = torch.full_like(ids, NO_LABEL)
    return Condition(labels=ids, text=text, sizes=size_rows(model, tokenizer, num_samples))


def solver_options(sampler: str, sde_last_step: float, sde_last_step_mode: str) -> dict[str, Any]:
    """The solver's own settings: the sde sampler's last step (level and form)."""
    return {"last_step": sde_last_step, "last_step_mode": sde_last_step_mode} if sampler == "sde" else {}


def batches(count: int, size: int) -> list[range]:
    if size < 1:
        raise ValueError(f"batch_size={size} must be >= 1")
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


@dataclass
class SamplingPlan:
    """What to generate: the samples' condition (N rows), the solver and guidance, the noise seed."""

    tokenizer: Tokenizer
    condition: Condition
    solver: str = "euler"
    steps: int = 50
    cfg_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    shift: float = 1.0
    solver_options: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    seed: int = 0
    batch_size: int = 32
    init: Tensor | None = None  # refine this raw sample (noised to `strength`) instead of starting from noise
    strength: float = 0.3

    @property
    def num_samples(self) -> int:
        return self.condition.batch_size


def generate_batches(model, plan: SamplingPlan, on_evaluation: Callable[[], None] | None = None,
                     parts: list[range] | None = None) -> Iterator[tuple[range, Tensor, Generation]]:
    """(indices, decoded samples, generation) of each batch of the plan (or of `parts`, a subset of its indices)."""
    for part in parts if parts is not None else batches(plan.num_samples, plan.batch_size):
        condition = plan.condition.select(slice(part.start, part.stop))
        noise = NoiseSource(generators=sample_generators(plan.seed, part))
        options = {"cfg_scale": plan.cfg_scale, "guidance_interval": plan.guidance_interval, "noise": noise,
                   "shift": plan.shift, "precision": plan.precision, "on_evaluation": on_evaluation}
        if plan.init is None:
            out = sample_tokens(model, plan.tokenizer, condition, plan.steps, plan.solver, **options,
                                **plan.solver_options)
        else:  # refinement: start from the init sample noised to level `strength`
            out = refine_tokens(model, plan.tokenizer, plan.init.expand(len(part), *plan.init.shape), plan.strength,
                                condition, plan.steps, plan.solver, **options)
        yield part, plan.tokenizer.decode(out.tokens).float(), out


class SampleWriter:
    """Writes each decoded batch as it comes: per-sample files, then a preview picture and (images) samples.npz."""

    def __init__(self, modality: str, tokenizer: Tokenizer, out_dir: Path, upscale: int = 1, grid_upscale: int = 4,
                 grid_max: int = 100):
        self.io, self.tokenizer, self.out_dir = modality_io(modality), tokenizer, Path(out_dir)
        self.upscale, self.grid_upscale, self.grid_max = upscale, grid_upscale, grid_max
        self.pixels: list[np.ndarray] = []
        self.preview: list[Tensor] = []
        self.files: dict[str, list[Path]] = {}

    def add(self, samples: Tensor, indices: range) -> None:
        room = max(0, self.grid_max - sum(len(p) for p in self.preview))
        if room:
            self.preview.append(samples[:room].cpu())
        if self.io.arrays:
            self.pixels.append(writers.to_uint8(samples))
        names = [f"{i:06d}" for i in indices]
        written = self.io.write(samples, self.out_dir / self.io.folder, names, self.tokenizer, self.upscale)
        for key, paths in written.items():
            self.files.setdefault(key, []).extend(paths)

    def finish(self, labels: Tensor, nrow: int | None) -> dict[str, list[Path]]:
        if self.io.preview_name is not None:
            preview = self.io.preview(torch.cat(self.preview), self.out_dir / self.io.preview_name, self.tokenizer,
                                      nrow=nrow, upscale=self.grid_upscale)
            self.files[Path(self.io.preview_name).stem] = [preview]
        if self.io.arrays:
            self.files["npz"] = [writers.save_npz(np.concatenate(self.pixels), self.out_dir / "samples.npz", labels)]
        return self.files
